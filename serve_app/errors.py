"""One error shape for every failure, and one function that maps exceptions to status codes."""

from __future__ import annotations

import logging
import math

from pydantic import ValidationError
from starlette.responses import JSONResponse

from deployments.denoiser.lora.errors import LoraHubUnavailableError, LoraRequestError
from deployments.denoiser.lora.hub import RETRY_AFTER_S as HUB_RETRY_AFTER_S
from deployments.runtime.deadlines import DeadlineExceeded
from deployments.weights.model_source import ModelSourceError
from deployments.style.presets import UnknownStyleError
from serve_app.access_log import current_request_id
from serve_app.image_store.base import StoreError
from serve_app.protocol import ErrorInfo, ErrorResponse
from serve_app.retry import is_replica_failure

logger = logging.getLogger("ray.serve")


class ApiError(Exception):
    """An error the client should see, with its HTTP status, OpenAI error type, param and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or default_type(status)
        self.retry_after_s = retry_after_s  # when to come back: a 503's or 429's Retry-After

    def __reduce__(self):
        """Pickled whole, so that a handle caller (another Ray process) gets it back with its status,
        code and Retry-After, not an exception Ray could not rebuild."""
        return type(self), (self.status, self.message, self.param, self.code, self.type, self.retry_after_s)


def default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_exceeded"
    if status == 503:
        return "server_overloaded"
    if status == 504:
        return "timeout_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def deadline_exceeded(timeout_s: float | None = None) -> ApiError:
    within = f" within its {timeout_s:g}s deadline" if timeout_s is not None else " before its deadline"
    return ApiError(504, f"The request did not finish{within}; its work was stopped.", code="deadline_exceeded")


def from_validation_error(exc: ValidationError) -> ApiError:
    """Pydantic's first problem as a 400 that names the parameter."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__") or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return ApiError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def api_error_for(exc: BaseException) -> ApiError:
    """Maps any exception from our code or a stage to the error the client gets; 500s say nothing internal."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, UnknownStyleError):
        return bad_request(str(exc), param="style")
    if isinstance(exc, LoraRequestError):  # from the Denoiser: a file that does not fit, a replica without LoRA
        return bad_request(f"Invalid value for 'loras': {exc}", param="loras", code="invalid_lora")
    if isinstance(exc, LoraHubUnavailableError):  # not cached and the hub unreachable: retry later
        return ApiError(503, f"{exc}; retry shortly.", param="loras", code="lora_unavailable",
                        retry_after_s=HUB_RETRY_AFTER_S)
    if isinstance(exc, DeadlineExceeded):
        return deadline_exceeded()
    if isinstance(exc, StoreError):  # the detail (a path, a bucket's answer) goes to the log only
        logger.error("image store: %s", exc)
        return ApiError(503, "The image store could not keep the images; nothing was stored. Retry shortly, "
                             "or ask for response_format 'b64_json'.", param="response_format", code=exc.code)
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return api_error_for(cause)
    if is_replica_failure(exc):  # still failing after the pipeline's retries
        return ApiError(503, "A stage of the server is restarting; retry shortly.", code="replica_unavailable")
    name = type(exc).__name__
    if "BackPressure" in name or "DeploymentUnavailable" in name:
        return ApiError(503, "The server is overloaded; retry shortly.", code="overloaded")
    if isinstance(exc, TimeoutError):
        return ApiError(503, "The request timed out inside the server; retry shortly.", code="timeout")
    if isinstance(exc, ModelSourceError):
        logger.error("model source error: %s", exc)
        return ApiError(503, "The model is not available.", code="model_unavailable")
    logger.exception("internal error", exc_info=exc)
    return ApiError(500, "The server had an internal error while processing the request.", code="internal_error")


def error_info(error: ApiError) -> ErrorInfo:
    """The error body's `error` object; it names the request's ID (Serve's request context)."""
    return ErrorInfo(message=error.message, type=error.type, param=error.param, code=error.code,
                     request_id=current_request_id())


def error_response(error: ApiError) -> JSONResponse:
    body = ErrorResponse(error=error_info(error))
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.retry_after_s is not None:
        headers.update(retry_after_headers(error.retry_after_s))
    return JSONResponse(body.model_dump(), status_code=error.status, headers=headers or None)


def retry_after_headers(seconds: float) -> dict[str, str]:
    """`Retry-After` in whole seconds (HTTP's form) and `retry-after-ms`, which OpenAI's clients read first."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}
