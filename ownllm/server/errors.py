"""ServerError: an error the client caused or must hear about, with its HTTP status; each API (openai.py,
ollama.py) renders it in its own shape. Plain data: it neither logs nor renders."""

from __future__ import annotations


class ServerError(Exception):
    """An error the client caused or must hear about; each API renders it in its own shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
