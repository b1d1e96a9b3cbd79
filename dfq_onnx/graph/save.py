"""Writing the output: external data streamed to disk as it is produced, then an atomic publish.

Everything is written into a hidden work directory beside the output
(`.<name>.partial/`) and moved into place only when complete, model file last, so a
failed or interrupted run never leaves a half-written model where the user looks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import DfqError

ALIGNMENT = 64  # byte alignment of each tensor in the data file
COPY_CHUNK = 64 << 20
INLINE_LIMIT = 1024  # tensors at most this many bytes stay inside the .onnx file


def work_dir_for(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def written_bytes(output: Path) -> int:
    """Bytes of a published model: the graph and its external data file."""
    data = output.with_name(data_location_for(output))
    return output.stat().st_size + (data.stat().st_size if data.exists() else 0)


def data_location_for(output: Path) -> str:
    return f"{output.name}.data"


def check_output_path(output: Path, input_path: Path, input_data_files: set[Path]) -> None:
    """Refuse any output that would overwrite the input model or the data it reads."""
    out = output.resolve()
    if out == input_path.resolve():
        raise DfqError(f"output {output} is the input model; choose another -o path")
    if out in input_data_files:
        raise DfqError(f"output {output} is the input's external data file; choose another -o path ending in .onnx")
    data = (output.parent / data_location_for(output)).resolve()
    if data in input_data_files:
        raise DfqError(f"output {output} would overwrite the input's external data {data.name}; choose another -o path")
    if output.suffix != ".onnx":
        raise DfqError(f"output {output} should end in .onnx")
    if not output.parent.exists():
        raise DfqError(f"output directory {output.parent} does not exist; create it first")
    if not output.parent.is_dir():
        raise DfqError(f"output directory {output.parent} is a file, not a directory; choose another -o path")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise DfqError(f"output directory {output.parent} is not writable; choose another -o path")
    if output.exists() and output.is_dir():
        raise DfqError(f"output {output} is a directory; give a file path ending in .onnx")


class OutputLock:
    """An exclusive claim on one output path for the whole run: a second run on it stops at once.

    A lock file `.<name>.lock` beside the output holds the owner's pid; the claim is an flock on it,
    so it ends with the process however the process ends (a stale file after SIGKILL is re-claimed).
    """

    def __init__(self, output: Path):
        self.output = output
        self.path = output.parent / f".{output.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = _guarded(lambda: os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), self.output.parent)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise DfqError(
                    f"another dfq-onnx run is writing {self.output} (pid {owner}); wait for it to finish or choose another -o path"
                ) from None
            # The file may have been removed by its previous owner between our open and our lock: retry on the new one.
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def make_work_dir(work: Path) -> None:
    """A fresh work directory; a stale file of the same (our own) name is removed first."""
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        _guarded(work.unlink, work.parent)
    _guarded(work.mkdir, work.parent)


def _guarded(action, where: Path):
    try:
        return action()
    except OSError as exc:
        raise DfqError(f"cannot write in {where} ({exc.strerror}); choose another -o path") from None


NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def write_error(exc: OSError, output: Path) -> DfqError:
    """A failed write, said in one line (nothing was published: the model is moved into place last)."""
    if exc.errno in NO_SPACE:
        return DfqError(f"no space left while writing {output} ({exc.strerror}); nothing was published")
    return DfqError(f"cannot write {output} ({exc.strerror}); nothing was published")


class ExternalDataWriter:
    """Appends tensors to one external data file and hands back references to them."""

    def __init__(self, directory: Path, location: str, start_offset: int = 0):
        self.directory = directory
        self.location = location
        self.path = directory / location
        mode = "r+b" if start_offset else "wb"
        self._file = open(self.path, mode)
        if start_offset:
            self._file.truncate(start_offset)
            self._file.seek(start_offset)
        self.offset = start_offset

    def _align(self) -> None:
        pad = (-self.offset) % ALIGNMENT
        if pad:
            self._file.write(b"\0" * pad)
            self.offset += pad

    def write(self, name: str, data: np.ndarray, dtype: ir.DataType, shape: tuple[int, ...]) -> ir.ExternalTensor:
        self._align()
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        start = self.offset
        self._file.write(memoryview(raw))
        self.offset += raw.nbytes
        return self._reference(name, dtype, shape, start, raw.nbytes)

    def copy_tensor(self, name: str, tensor: ir.TensorProtocol) -> ir.ExternalTensor:
        """Stream an existing tensor (external or in memory) into the file without holding it whole."""
        self._align()
        start = self.offset
        if isinstance(tensor, ir.ExternalTensor):
            length = tensor.length if tensor.length is not None else tensor.nbytes
            with open(tensor.path, "rb") as src:
                if not self._copy_in_kernel(src, tensor.offset or 0, length):
                    src.seek(tensor.offset or 0)
                    remaining = length
                    while remaining:
                        chunk = src.read(min(COPY_CHUNK, remaining))
                        if not chunk:
                            raise DfqError(f"external data of '{name}' ends early; the input file is truncated")
                        self._file.write(chunk)
                        remaining -= len(chunk)
        else:
            self._file.write(tensor.tobytes())
        length = self.offset_after_write() - start
        return self._reference(name, tensor.dtype, tuple(tensor.shape.numpy()), start, length)

    def _copy_in_kernel(self, src, offset: int, length: int) -> bool:
        """Copy file to file without passing the bytes through this process (copy_file_range).

        Several times faster than read/write for the float tensors a model keeps (embedding,
        lm_head), and it touches no user memory. False when the platform or file system refuses.
        """
        if not hasattr(os, "copy_file_range") or length == 0:
            return False
        self._file.flush()
        start, done = self._file.tell(), 0
        try:
            while done < length:
                n = os.copy_file_range(src.fileno(), self._file.fileno(), length - done, offset + done, start + done)
                if n == 0:
                    raise DfqError("external data of a tensor ends early; the input file is truncated")
                done += n
        except OSError:
            self._file.seek(start)
            self._file.truncate(start)
            return False
        self._file.seek(start + length)
        return True

    def offset_after_write(self) -> int:
        self.offset = self._file.tell()
        return self.offset

    def _reference(self, name: str, dtype: ir.DataType, shape: tuple[int, ...], offset: int, length: int):
        return ir.ExternalTensor(
            self.location,
            offset=offset,
            length=length,
            dtype=dtype,
            shape=ir.Shape(shape),
            name=name,
            base_dir=str(self.directory),
        )

    def flush(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()


def externalize_remaining(model: ir.Model, writer: ExternalDataWriter, keep_names: set[str]) -> None:
    """Copy every other large initializer into the output's data file (the input's file is never shared)."""
    for name, value in model.graph.initializers.items():
        if name in keep_names or value.const_value is None:
            continue
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) or tensor.nbytes > INLINE_LIMIT:
            value.const_value = writer.copy_tensor(name, tensor)


def publish(work: Path, output: Path, location: str, extra: list[str] = ()) -> None:
    """Move the finished files into place: data first, then the `extra` files beside the model,
    model last (each an atomic rename, so a model file and a data file are there at every
    instant); then remove the work directory."""
    os.replace(work / location, output.parent / location)
    for name in extra:
        os.replace(work / name, output.parent / name)
    os.replace(work / output.name, output)
    shutil.rmtree(work, ignore_errors=True)


def save_model(model: ir.Model, path: Path) -> None:
    """Serialise the graph; every large tensor is already an external reference into the data file."""
    try:
        ir.save(model, path)
    except ValueError as exc:
        raise DfqError(f"cannot serialise the output model: {exc}") from None


def write_companions(files: dict[str, Path | bytes], directory: Path) -> None:
    """Files published beside the model (an onnxruntime-genai folder's config and tokenizer): put
    them in the (unpublished) work directory; publishing moves them with the model."""
    for name, source in files.items():
        target = directory / name
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)


