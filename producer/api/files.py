"""OpenAI Files API, as the Batch API needs it: upload a JSONL input (purpose ``batch``), read
files and their content (batch output and error files too), list and delete them."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from producer.api.context import get_ctx, list_page
from producer.errors import InvalidRequest
from producer.files import READ_CHUNK, UPLOAD_PURPOSES

router = APIRouter(tags=["files"])


@router.post("/v1/files", summary="Upload a file (purpose batch: a JSONL of batch requests)")
async def upload_file(
    request: Request,
    file: UploadFile = File(..., description="the JSONL file"),
    purpose: str = Form(..., description="batch"),
) -> dict[str, Any]:
    ctx = get_ctx(request)
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"purpose {purpose!r} is not supported; vlq stores files for the Batch API: purpose 'batch'",
            param="purpose",
        )
    filename = file.filename or "upload.jsonl"

    def store() -> Any:
        writer = ctx.files.writer(filename=filename, purpose=purpose)
        try:
            file.file.seek(0)
            while chunk := file.file.read(READ_CHUNK):
                writer.write(chunk)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    stored = await ctx.run(store)
    return stored.model_dump()


@router.get("/v1/files", summary="List files, newest first")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    ctx = get_ctx(request)
    files, has_more = await ctx.run(ctx.files.list, purpose=purpose, after=after, limit=limit, order=order)
    return list_page([f.model_dump() for f in files], has_more)


@router.get("/v1/files/{file_id}", summary="A file's metadata")
async def get_file(request: Request, file_id: str) -> dict[str, Any]:
    ctx = get_ctx(request)
    return (await ctx.run(ctx.files.get, file_id)).model_dump()


@router.get("/v1/files/{file_id}/content", summary="A file's bytes")
async def file_content(request: Request, file_id: str) -> StreamingResponse:
    ctx = get_ctx(request)
    meta = await ctx.run(ctx.files.get, file_id)
    chunks = await ctx.run(ctx.files.iter_content, file_id)

    async def body():
        while True:
            piece = await ctx.run(next, chunks, None)
            if piece is None:
                return
            yield piece

    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{_header_safe(meta.filename)}"'},
    )


@router.delete("/v1/files/{file_id}", summary="Delete a file")
async def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    ctx = get_ctx(request)
    await ctx.run(ctx.files.delete, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def _header_safe(filename: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename) or "file"
