"""A form body read into the JSON body it stands for. The ``openai`` SDK's ``videos.create``
sends ``multipart/form-data`` (its ``extra_body`` too, as form fields), so ``POST /v1/videos``
takes that form as well as JSON: ``steps=20`` is 20, ``init[]=0`` and ``init[]=2`` are [0, 2],
``params[num_frames]=9`` is ``{"num_frames": 9}``. Parsed by Starlette's own form parser
(python-multipart) from the body already read within ``max_body_bytes``; files are refused,
naming their field. A body labelled ``application/x-www-form-urlencoded`` is read as JSON, as
before (curl -d and urllib label JSON so).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator
from typing import Any

from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from chords_mq.gateway.errors import ApiError, invalid

MULTIPART = "multipart/form-data"
MAX_FIELDS = 256
INTEGERS = frozenset({"n", "steps", "cores", "seed", "partial_images"})
NUMBERS = frozenset({"guidance_scale"})
BOOLEANS = frozenset({"stream"})
_INTEGER = re.compile(r"^-?[0-9]{1,19}$")
_NUMBER = re.compile(r"^-?[0-9]{1,19}(\.[0-9]{1,19})?([eE][-+]?[0-9]{1,2})?$")
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,63})(?:\[([A-Za-z0-9_]{0,64})\])?$")


def form_type(content_type: str | None) -> str | None:
    """``multipart/form-data`` if ``content_type`` is that, else None."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return media if media == MULTIPART else None


async def read_form(headers: Headers, data: bytes) -> dict[str, Any]:
    """The body ``data`` (a multipart form, as ``headers`` say) as the JSON body it stands for;
    a 400 naming the field for anything that is not one."""

    async def chunks() -> AsyncGenerator[bytes, None]:
        yield data

    size = len(data) + 1  # the body is bounded already; a part is at most all of it
    parser = MultiPartParser(
        headers, chunks(), max_files=MAX_FIELDS, max_fields=MAX_FIELDS, max_part_size=size
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"the form body cannot be read: {exc}", code="invalid_form") from None
    try:
        return body_of(form.multi_items())
    finally:
        await form.close()


def body_of(items: list[tuple[str, str | UploadFile]]) -> dict[str, Any]:
    """Form fields as a JSON body: ``name``, ``name[]`` (a list) and ``name[key]`` (an
    object); the numeric fields as numbers."""
    body: dict[str, Any] = {}
    for key, value in items:
        match = _KEY.match(key)
        name = key if match is None else match.group(1)
        if isinstance(value, UploadFile):
            text = f"{name}: files are not accepted here (send text fields or a JSON body)"
            raise invalid(text, name, "unsupported_file")
        if match is None:
            text = f"not a usable form field name: {key[:64]!r}"
            raise ApiError(400, text, code="invalid_form")
        member = match.group(2)
        if member is None:
            if name in body:
                raise invalid(f"{name} is given twice", name, "invalid_form")
            body[name] = scalar(name, value)
            continue
        held = body.setdefault(name, [] if member == "" else {})
        if member == "" and isinstance(held, list):
            held.append(loose(value))
        elif member != "" and isinstance(held, dict) and member not in held:
            held[member] = loose(value)
        else:
            raise invalid(f"{name}: its form fields do not agree ({key!r})", name, "invalid_form")
    return body


def scalar(name: str, value: str) -> Any:
    """A top-level field's value: a number for the numeric fields (where it reads as one; else
    the text, which the body's own checks then refuse naming the field), else the text."""
    if name in INTEGERS and _INTEGER.match(value):
        return int(value)
    if name in NUMBERS and _NUMBER.match(value):
        return float(value)
    if name in BOOLEANS and value in ("true", "false"):
        return value == "true"
    return value


def loose(value: str) -> Any:
    """A list item's or a model parameter's value: a JSON number, true, false or null where it
    reads as one, else the text."""
    if value in ("true", "false", "null") or _NUMBER.match(value):
        number: Any = json.loads(value)
        return number
    return value
