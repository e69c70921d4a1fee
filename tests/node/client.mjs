// OpenAI's Node SDK against a running zimage-serve: generate, edit with a file, stream, and (when the
// server offers it) a `url` download. Usage: node client.mjs <base url> <out dir> <input png>
// Writes each image into <out dir> and prints one JSON summary line; tests/integration/test_node_client.py
// checks the images against the server's own answers.
import { readFile, writeFile } from "node:fs/promises";
import OpenAI, { toFile } from "openai";

const [baseURL, outDir, inputPng] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey: "unused", maxRetries: 0, timeout: 300_000 });
// Z-Image's own fields travel beside OpenAI's in the body, as the SDK sends what it is given.
const extra = { seed: 7, num_inference_steps: 2 };
const summary = {};

async function save(name, b64) {
  await writeFile(`${outDir}/${name}.png`, Buffer.from(b64, "base64"));
  return name;
}

const generated = await client.images.generate({ prompt: "a red fox in fresh snow", size: "512x512", ...extra });
summary.generate = { file: await save("generate", generated.data[0].b64_json), seed: generated.data[0].seed,
                     size: generated.size, created: generated.created };

const image = await toFile(await readFile(inputPng), "input.png", { type: "image/png" });
const edited = await client.images.edit({ image, prompt: "the same, at night", strength: 1.0, ...extra });
summary.edit = { file: await save("edit", edited.data[0].b64_json), size: edited.size };

const stream = await client.images.generate({ prompt: "a red fox in fresh snow", size: "512x512", stream: true,
                                              partial_images: 1, ...extra });
const types = [];
for await (const event of stream) {
  types.push(event.type);
  if (event.type === "image_generation.completed") summary.stream = { file: await save("stream", event.b64_json) };
}
summary.stream = { ...summary.stream, types };

try {
  const byUrl = await client.images.generate({ prompt: "a red fox in fresh snow", size: "512x512",
                                               response_format: "url", ...extra });
  const response = await fetch(byUrl.data[0].url);
  const bytes = Buffer.from(await response.arrayBuffer());
  await writeFile(`${outDir}/url.png`, bytes);
  summary.url = { file: "url", status: response.status, url: byUrl.data[0].url };
} catch (error) {
  if (!(error instanceof OpenAI.APIError)) throw error;
  summary.url = { error: { status: error.status, code: error.code, param: error.param } };
}

console.log(JSON.stringify(summary));
