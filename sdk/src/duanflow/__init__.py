"""DuanFlow: Python functions on your own GPUs.

Example::

    import duanflow as df

    app = df.App("hello-gpu")

    @app.function(gpu="H100", timeout=300)
    def classify_ticket(text: str) -> dict:
        return {"label": "timeout", "input": text}

    # after `duanflow deploy hello.py`:
    classify_ticket.remote("我的模型接口超时了")
"""

from duanflow import _storage as storage
from duanflow._app import App
from duanflow._auth import Auth
from duanflow._cls import Cls, enter, exit, method
from duanflow._errors import (
    BuildFailedError,
    CallCancelledError,
    ConflictError,
    DeadlineExceededError,
    DeserializationError,
    DuanFlowError,
    FunctionTimeoutError,
    InternalError,
    InvalidInputError,
    InvalidOptionError,
    NoCapacityError,
    NoMatchingGpuError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RemoteError,
    UnauthenticatedError,
    UnavailableError,
)
from duanflow._function import Function, FunctionCall
from duanflow._image import Image
from duanflow._job import Job
from duanflow._queue import Queue, current_job_id
from duanflow._request import Request
from duanflow._response import Response
from duanflow._retries import Retries
from duanflow._secret import Secret

__version__ = "0.1.0"

__all__ = [
    "App",
    "Auth",
    "BuildFailedError",
    "CallCancelledError",
    "Cls",
    "ConflictError",
    "DeadlineExceededError",
    "DeserializationError",
    "DuanFlowError",
    "Function",
    "FunctionCall",
    "FunctionTimeoutError",
    "Image",
    "InternalError",
    "InvalidInputError",
    "InvalidOptionError",
    "Job",
    "NoCapacityError",
    "NoMatchingGpuError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Queue",
    "RemoteError",
    "Request",
    "Response",
    "Retries",
    "Secret",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
    "current_job_id",
    "enter",
    "exit",
    "method",
    "storage",
]
