"""The work waiting for a Denoiser's GPU, in one unit the autoscaler can divide by a target.

A unit is one denoising step of one 1024x1024 image (a "megapixel-step"): a DiT step costs about
in proportion to the image's tokens, so a 2048x2048 image's step counts 4 and a 512x512 one 0.25.
Queued images count all the steps they will run; running images the steps they have left.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from deployments.contracts import DenoiseJob

REFERENCE_PIXELS = 1024 * 1024


def job_steps(job: DenoiseJob) -> int:
    """Steps the job runs: image-to-image skips the noisiest `steps * (1 - strength)`."""
    if job.init_posterior is None:
        return job.steps
    from deployments.denoiser.loop import first_step_index  # the Ingress's backlog imports this module too

    return job.steps - first_step_index(job.steps, job.strength)


def step_cost(job: DenoiseJob) -> float:
    """One step of this job in megapixel-steps."""
    return job.width * job.height / REFERENCE_PIXELS


@dataclass(frozen=True)
class PendingWork:
    queued_images: int = 0
    running_images: int = 0
    queued_steps: int = 0
    running_steps_left: int = 0
    work: float = 0.0
    """Megapixel-steps of queued and running images together: what the autoscaling policy reads."""

    def as_metrics(self) -> dict[str, float]:
        """Ray Serve's `record_autoscaling_stats` shape: metric name to a number."""
        return {
            "queued_images": self.queued_images,
            "running_images": self.running_images,
            "queued_steps": self.queued_steps,
            "running_steps_left": self.running_steps_left,
            "pending_work": round(self.work, 4),
        }


def measure(queued: Iterable[DenoiseJob], running: Iterable[tuple[DenoiseJob, int]]) -> PendingWork:
    """`queued`: jobs not started; `running`: (job, steps it has left)."""
    queued_images = running_images = queued_steps = running_steps = 0
    work = 0.0
    for job in queued:
        steps = job_steps(job)
        queued_images += 1
        queued_steps += steps
        work += steps * step_cost(job)
    for job, left in running:
        running_images += 1
        running_steps += left
        work += left * step_cost(job)
    return PendingWork(queued_images, running_images, queued_steps, running_steps, work)
