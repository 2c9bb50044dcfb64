"""Output files written safely: reserved before any model loads, committed when complete.

An output is *reserved* before any model loads: `reserve` checks the name and claims it by
creating a hidden temporary file (or folder) next to it, so a user learns at once that an
output cannot be written (a missing or read-only folder, a path under a file, an existing
folder or file), and an interrupted run never leaves a half-written file under the final
name. A writer fills the temporary file; `Reservation.commit` renames it onto the final
name only when it is complete.

    PNG    png_bytes / read_png (stdlib only), write_png
    video  models/video_file.py (MP4 through imageio-ffmpeg, or PNG frames without it)

    res = reserve(Path("out.png"), force=False)     # OutputError: one line, exit before loading
    with res:                                       # leaving the block uncommitted aborts
        ... load models, sample ...
        write_png(res, rgb, text)                   # writes the temp file, then commits
"""

import os
import re
import secrets
import shutil
import struct
import zlib
from pathlib import Path

import torch

FRAME_NAME = "frame_{:05d}.png"  # a video's frames without imageio-ffmpeg
SETTINGS_NAME = "settings.json"
_FRAMES_ENTRY = re.compile(r"frame_\d+\.png|settings\.json")


class OutputError(ValueError):
    """An output cannot be written (or was not): one line naming the path and the fix."""


# ---------------------------------------------------------------------------------------
# PNG: RGB, 8 bit, tEXt chunks (stdlib only)
# ---------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(rgb: torch.Tensor, text: dict[str, str]) -> bytes:
    """(H, W, 3) uint8 -> a PNG with one tEXt chunk per entry of text (Latin-1)."""
    h, w, c = rgb.shape
    if c != 3 or rgb.dtype != torch.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {tuple(rgb.shape)} {rgb.dtype}")
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), rgb.reshape(h, w * 3).cpu()], 1)
    data = zlib.compress(rows.numpy().tobytes(), 6)  # filter 0 (none) on every row
    out = [PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    for key, value in text.items():
        out.append(_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1")))
    step = 1 << 24
    out += [_chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step)]
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def read_png(data: bytes) -> dict:
    """The width, height and tEXt entries of a PNG (CRCs checked)."""
    if data[:8] != PNG_SIGNATURE:
        raise ValueError("not a PNG: bad signature")
    pos, info = 8, {"text": {}}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"bad CRC in a {kind!r} chunk")
        if kind == b"IHDR":
            info["width"], info["height"], info["bit_depth"], info["color_type"] = struct.unpack(
                ">IIBB", body[:10]
            )
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            info["text"][key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + n
    return info


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8, on the CPU."""
    x = ((image[0].cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous()


# ---------------------------------------------------------------------------------------
# names: suffixes and what a video output becomes
# ---------------------------------------------------------------------------------------


def check_suffix(path, allowed) -> Path:
    """path as a Path if its suffix is one of allowed (e.g. (".png",)), else OutputError."""
    path, allowed = Path(path), tuple(s.lower() for s in allowed)
    if path.suffix.lower() not in allowed:
        kinds = " or ".join(s.lstrip(".").upper() for s in allowed)
        given = f"'{path.suffix}'" if path.suffix else "a name without suffix"
        example = path.with_suffix(allowed[0]) if path.name else f"out{allowed[0]}"
        raise OutputError(
            f"{path}: this output is written as {kinds} only, not {given}; give a name "
            f"ending in {' or '.join(allowed)} (e.g. --out {example})"
        )
    return path


# ---------------------------------------------------------------------------------------
# reservations: a temporary name next to the output, renamed onto it when complete
# ---------------------------------------------------------------------------------------


def _temp_name(path: Path, token: str, hidden: bool = True) -> Path:
    """.NAME.partXXXXXXXX.SUFFIX next to path (the suffix kept, so ffmpeg knows the format)."""
    return path.with_name(f"{'.' if hidden else ''}{path.stem}.part{token}{path.suffix}")


def _check_folder(path: Path) -> None:
    """OutputError unless path's folder exists as a folder (never created here)."""
    parent = path.parent
    if parent.is_dir():
        return
    above = parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        raise OutputError(
            f"{path}: {above} is a file, not a folder; choose an --out in an existing folder"
        )
    raise OutputError(
        f"{path}: the folder {parent} does not exist (not created); create it first, or "
        "choose another --out"
    )


def _is_frames_folder(path: Path) -> bool:
    """Whether path holds only what a frames writer writes (so --force may replace it)."""
    try:
        return all(_FRAMES_ENTRY.fullmatch(p.name) and p.is_file() for p in path.iterdir())
    except OSError:
        return False


def _check_existing(path: Path, force: bool, folder: bool) -> None:
    """OutputError when what is at path must not be replaced (a folder, or force is off)."""
    if not folder and path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name (--out FOLDER/NAME)")
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{path} exists and is not a folder; not replaced (choose another --out)")
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise OutputError(f"{path} exists; not overwritten (pass --force, or another --out)")
    if folder and not _is_frames_folder(path):
        raise OutputError(
            f"{path} holds files other than frames and {SETTINGS_NAME}; not replaced even "
            "with --force (choose another --out)"
        )


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


class Reservation:
    """An output claimed by a temporary file (or folder) `temp` next to its final `path`.

    commit() renames temp onto path; abort() removes temp. As a context manager, leaving
    the block without a commit (an exception, or a writer that never finished) aborts.
    """

    def __init__(self, path: Path, temp: Path, force: bool, folder: bool, token: str):
        self.path, self.temp, self.force, self.folder = path, temp, force, folder
        self._token = token
        self.done = False  # committed or aborted
        self.committed = False

    def __repr__(self) -> str:
        return f"Reservation({str(self.path)!r}, temp={str(self.temp)!r}, done={self.done})"

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        if not self.done:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary file or folder (nothing under the final name changes)."""
        self.done = True
        if self.folder:
            shutil.rmtree(self.temp, ignore_errors=True)
        else:
            try:
                os.unlink(self.temp)
            except FileNotFoundError:
                pass

    def commit(self) -> Path:
        """Rename the finished temp onto the final name; returns the final path.

        Without force, a final name that appeared meanwhile is kept: the result is renamed
        to the visible NAME.partXXXXXXXX.SUFFIX instead and OutputError says where it is.
        """
        if self.done:
            raise RuntimeError(f"{self!r} was already committed or aborted")
        if self.folder:
            self._commit_folder()
        elif self.force:
            _fsync_file(self.temp)
            self._rename(lambda: os.replace(self.temp, self.path))
        else:
            _fsync_file(self.temp)
            self._rename(self._link_no_clobber)
        self.done = self.committed = True
        _fsync_dir(self.path.parent)
        return self.path

    def _link_no_clobber(self) -> None:
        """temp -> path, failing with FileExistsError when path exists (atomic via link)."""
        try:
            os.link(self.temp, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (e.g. FAT): check, then rename
            if self.path.exists() or self.path.is_symlink():
                raise FileExistsError(self.path) from None
            os.rename(self.temp, self.path)
            return
        os.unlink(self.temp)

    def _commit_folder(self) -> None:
        """Rename the temp folder onto path; with force, a previous frames folder goes."""
        if not (self.path.exists() or self.path.is_symlink()):
            self._rename(lambda: os.rename(self.temp, self.path))
            return
        if not self.force:
            self._keep("appeared while this ran; not overwritten (pass --force to overwrite)")
        if not self.path.is_dir() or not _is_frames_folder(self.path):
            self._keep("appeared while this ran and is not a frames folder; not replaced")
        old = self.path.with_name(f".{self.path.name}.old{self._token}")
        os.rename(self.path, old)
        try:
            os.rename(self.temp, self.path)
        except OSError as e:
            os.rename(old, self.path)
            self._keep(f"could not be replaced ({e.strerror or e})")
        shutil.rmtree(old, ignore_errors=True)

    def _rename(self, rename) -> None:
        """Run rename(); on failure keep the result under a visible name and say where."""
        try:
            rename()
        except FileExistsError:
            self._keep("appeared while this ran; not overwritten (pass --force to overwrite)")
        except OSError as e:
            self._keep(f"could not be replaced ({e.strerror or e})")

    def _keep(self, reason: str):
        """Rename temp to the visible NAME.partXXXXXXXX.SUFFIX and raise OutputError."""
        kept = _temp_name(self.path, self._token, hidden=False)
        try:
            os.rename(self.temp, kept)
        except OSError:
            kept = self.temp
        self.done = True
        raise OutputError(f"{self.path} {reason}; nothing lost: the result is in {kept}")


def reserve(path, force: bool, folder: bool = False) -> Reservation:
    """Check that path can be written and claim it now with a temporary file next to it.

    OutputError (nothing created) when the folder is missing, the path is under a file,
    the folder is not writable, path is a folder (for a file), or path exists and force
    is off. folder=True reserves a folder (the PNG frames of a video) instead of a file.
    """
    path = Path(path)
    _check_folder(path)
    _check_existing(path, force, folder)
    for _ in range(100):
        token = secrets.token_hex(4)
        temp = _temp_name(path, token)
        try:
            if folder:
                os.mkdir(temp)
            else:
                os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(
                f"{path}: cannot create files in the folder {path.parent} ({e.strerror or e}): "
                "it is not writable (read-only?); choose another --out"
            ) from None
        return Reservation(path, temp, force, folder, token)
    raise OutputError(f"{path}: no free temporary name next to it; clean up {path.parent}")


# ---------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_png(reservation: Reservation, rgb: torch.Tensor, text: dict[str, str]) -> Path:
    """Write png_bytes(rgb, text) to the reserved temp file, fsync, commit; the final path.

    On any failure the reservation is aborted (the final name is left as it was).
    """
    try:
        check_suffix(reservation.path, (".png",))
        _write_synced(reservation.temp, png_bytes(rgb, text))
    except BaseException:
        reservation.abort()
        raise
    return reservation.commit()


def settings_json(args) -> dict:
    """A command line's settings (an argparse Namespace) as JSON values for a file's
    metadata: sizes as "WxH" (`levels` and `size` hold (H, W)), paths as strings."""
    out = {}
    for k, v in vars(args).items():
        if k == "levels" and v is not None:
            v = [f"{w}x{h}" for h, w in v]
        elif k == "size" and v is not None:
            v = f"{v[1]}x{v[0]}"
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, list):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        out[k] = v
    return out
