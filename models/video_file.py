"""Video files: H.264 MP4 through the ffmpeg of imageio-ffmpeg, or PNG frames without it.

    MP4     the ffmpeg binary that imageio-ffmpeg (the `io` extra) ships, run directly:
            raw RGB frames on its stdin -> libx264 (named explicitly), yuv420p, --fps,
            the settings JSON in the file's `comment` tag (read_mp4_metadata reads it
            back with `ffmpeg -i FILE -f ffmetadata -`: imageio-ffmpeg ships no ffprobe)
    frames  without imageio-ffmpeg: a folder NAME_frames/ (for NAME.mp4) of numbered PNGs
            frame_00000.png, ... and settings.json, and a message saying how to get MP4

Both write into an output reserved before any model loads (models/media.py) and commit it
only when complete. ffmpeg is started here rather than through imageio_ffmpeg.write_frames
because write_frames never checks ffmpeg's exit status (a name ffmpeg cannot map to a
format, such as x.mp4.part, or an odd width, writes nothing and raises nothing) and
lets ffmpeg's messages go to our stderr: here its exit status is checked, its messages are
kept for the error, the format is given (`-f mp4`), and the finished file is read back
(ffmpeg must count every frame written) before it is renamed.

    kind, final = video_target(path)                # ("mp4", x.mp4) or ("frames", x_frames)
    res = media.reserve(final, force, folder=kind == "frames")
    with res:
        ... sample ...
        message = write_video(res, video, fps, metadata)   # video (3, F, H, W) in [-1, 1]
"""

import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from models.media import (
    FRAME_NAME,
    SETTINGS_NAME,
    OutputError,
    Reservation,
    _fsync_dir,
    _write_synced,
    check_suffix,
    png_bytes,
    reserve,
)

MP4_HINT = 'pip install imageio-ffmpeg (or pip install -e ".[io]")'


def ffmpeg_exe() -> str | None:
    """The ffmpeg bundled with imageio-ffmpeg, or None when it is not installed."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # not installed, or installed without its binary
        return None


def frames_folder(path) -> Path:
    """Where the frames of NAME.mp4 go without imageio-ffmpeg: NAME_frames (a folder)."""
    path = Path(path)
    return path.with_name(path.stem + "_frames")


def video_target(path) -> tuple[str, Path]:
    """("mp4", path) when ffmpeg is there, else ("frames", NAME_frames): what to reserve.
    path must end in .mp4 (OutputError otherwise)."""
    path = check_suffix(path, (".mp4",))
    if ffmpeg_exe() is not None:
        return "mp4", path
    return "frames", frames_folder(path)


def reserve_video(path, force: bool) -> Reservation:
    """media.reserve() what video_target(path) says."""
    kind, final = video_target(path)
    return reserve(final, force, folder=kind == "frames")


def frames_message(folder, fps) -> str:
    """One line: the video became PNG frames, and how to get an MP4."""
    return (
        f"imageio-ffmpeg is not installed: the video is written as PNG frames in {folder}/ "
        f"instead of an MP4. To get MP4 files: {MP4_HINT}; to join these frames: ffmpeg "
        f"-framerate {fps} -i {Path(folder) / 'frame_%05d.png'} -c:v libx264 -pix_fmt yuv420p "
        "out.mp4"
    )


def _each_frame(frames, width: int, height: int):
    """uint8 (T, H, W, 3) numpy or torch -> one contiguous CPU (H, W, 3) tensor at a time."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1:] != (height, width, 3):
        raise ValueError(
            f"expected uint8 frames of shape (T, {height}, {width}, 3), "
            f"got {tuple(frames.shape)} {frames.dtype}"
        )
    for frame in frames:
        yield frame.cpu().contiguous()


# ---------------------------------------------------------------------------------------
# PNG frames (no imageio-ffmpeg)
# ---------------------------------------------------------------------------------------


class FramesWriter:
    """A video as numbered PNG frames plus settings.json in a reserved (temporary) folder.
    write(frames) takes uint8 (T, H, W, 3), any T, many times; close() commits the folder.
    Leaving a `with` block by an exception aborts."""

    def __init__(self, reservation: Reservation, fps, width: int, height: int, metadata: dict):
        if not reservation.folder:
            raise ValueError(f"{reservation!r} is a file; frames need a folder reservation")
        self.reservation, self.width, self.height = reservation, width, height
        self.frames = 0
        try:
            settings = json.dumps(metadata, ensure_ascii=False, indent=2) + "\n"
            _write_synced(reservation.temp / SETTINGS_NAME, settings.encode("utf-8"))
        except BaseException:
            reservation.abort()
            raise

    def __enter__(self) -> "FramesWriter":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.close()
        else:
            self.reservation.abort()

    def write(self, frames) -> None:
        try:
            for frame in _each_frame(frames, self.width, self.height):
                path = self.reservation.temp / FRAME_NAME.format(self.frames)
                _write_synced(path, png_bytes(frame, {}))
                self.frames += 1
        except BaseException:
            self.reservation.abort()
            raise

    def close(self) -> Path:
        if self.reservation.committed:
            return self.reservation.path
        if self.reservation.done:
            raise OutputError(f"{self.reservation.path}: the writing was aborted; nothing saved")
        if self.frames == 0:
            self.reservation.abort()
            raise OutputError(f"{self.reservation.path}: no frames were written; nothing saved")
        _fsync_dir(self.reservation.temp)
        return self.reservation.commit()


# ---------------------------------------------------------------------------------------
# MP4
# ---------------------------------------------------------------------------------------


def _summary(said: str, first: int = 3) -> str:
    """ffmpeg's messages on one line: the first few (the cause) and the last (the outcome)."""
    lines = [re.sub(r" @ 0x[0-9a-f]+", "", line) for line in said.splitlines() if line.strip()]
    if len(lines) > first + 1:
        lines = lines[:first] + ["..."] + lines[-1:]
    return " | ".join(lines) or "nothing"


def mp4_arguments(metadata: dict, crf: int, codec: str) -> list[str]:
    """ffmpeg's output arguments (after the raw-video input)."""
    comment = json.dumps(metadata, ensure_ascii=False)
    if len(comment.encode("utf-8")) > 100_000:  # one argv string may hold 128 KiB on Linux
        raise ValueError(f"the settings JSON is {len(comment)} characters; at most 100000 fit")
    return [
        "-an", "-c:v", codec, "-pix_fmt", "yuv420p", "-crf", str(crf), "-preset", "medium",
        "-movflags", "+faststart", "-metadata", f"comment={comment}", "-f", "mp4",
    ]  # fmt: skip


class VideoWriter:
    """An H.264 MP4 streamed to ffmpeg into a reserved temporary file.

    write(frames) takes uint8 (T, H, W, 3) numpy or torch, any T, many times (each frame
    goes straight to ffmpeg's stdin). close() waits for ffmpeg, checks its exit status and
    the file (an MP4 in which ffmpeg counts every frame written), then commits; any failure
    aborts (temp removed) and raises OutputError quoting ffmpeg."""

    def __init__(self, reservation: Reservation, fps, width: int, height: int, metadata: dict,
                 crf: int = 18, codec: str = "libx264"):  # fmt: skip
        if reservation.folder:
            raise ValueError(f"{reservation!r} is a folder; an MP4 needs a file reservation")
        self.reservation, self.width, self.height = reservation, width, height
        self.frames = 0
        self._log = tempfile.TemporaryFile()
        self._proc = None
        exe = ffmpeg_exe()
        if exe is None:
            self._fail(f"imageio-ffmpeg is not installed; {MP4_HINT}")
        try:
            out = mp4_arguments(metadata, crf, codec)
        except BaseException:
            self.abort()
            raise
        cmd = [exe, "-y", "-hide_banner", "-loglevel", "warning",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps),
               "-i", "-", *out, str(reservation.temp)]  # fmt: skip
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log
            )
        except OSError as e:
            self._fail(f"ffmpeg did not start ({e})")

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def ffmpeg_said(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace").strip()

    def _fail(self, what: str):
        self.abort()
        said = _summary(self.ffmpeg_said())
        raise OutputError(f"{self.reservation.path}: {what}; nothing written. ffmpeg said: {said}")

    def abort(self) -> None:
        """Stop ffmpeg (it ends once its input ends) and remove the temporary file."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait()
        self.reservation.abort()

    def write(self, frames) -> None:
        if self._proc is None:
            raise RuntimeError(f"{self.reservation.path}: the video writer is closed")
        try:
            for frame in _each_frame(frames, self.width, self.height):
                self._proc.stdin.write(frame.numpy().tobytes())
                self.frames += 1
        except ValueError:
            self.abort()
            raise
        except OSError as e:  # ffmpeg exited: a broken pipe
            self._fail(f"ffmpeg stopped after {self.frames} frames ({e.strerror or e})")
        except BaseException:
            self.abort()
            raise

    def close(self) -> Path:
        if self.reservation.committed:
            return self.reservation.path
        if self.reservation.done or self._proc is None:
            raise OutputError(f"{self.reservation.path}: the writing was aborted; nothing saved")
        proc, self._proc = self._proc, None
        try:
            proc.stdin.close()
        except OSError:
            pass
        code = proc.wait()
        if code != 0:
            self._fail(f"ffmpeg failed (exit status {code})")
        problem = self._check()
        if problem:
            self._fail(problem)
        return self.reservation.commit()

    def _check(self) -> str | None:
        """None when the finished temp file is an MP4 holding every frame, else why not."""
        if self.frames == 0:
            return "no frames were written"
        temp = self.reservation.temp
        if not temp.exists() or temp.stat().st_size == 0:
            return "ffmpeg wrote an empty file"
        with open(temp, "rb") as f:
            if f.read(8)[4:8] != b"ftyp":
                return "ffmpeg did not write an MP4 (no ftyp box)"
        count = count_frames(temp)
        if count != self.frames:
            return f"ffmpeg reads back {count} frames of the {self.frames} written"
        return None


def count_frames(path) -> int | None:
    """Video frames in a file, counted by ffmpeg from its packets (no decoding: fast)."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0",
           "-c", "copy", "-f", "null", "-"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True)
    found = re.findall(r"frame=\s*(\d+)", run.stderr)
    return int(found[-1]) if run.returncode == 0 and found else None


# ---------------------------------------------------------------------------------------
# writing a decoded video; reading the settings back
# ---------------------------------------------------------------------------------------


def open_video(target, fps, width: int, height: int, metadata: dict, force: bool = False):
    """(writer, message): a VideoWriter, or a FramesWriter when the reservation is a
    folder (no imageio-ffmpeg); target is a Reservation or an .mp4 path. The message is ""
    for an MP4, else frames_message."""
    res = target if isinstance(target, Reservation) else reserve_video(target, force)
    if res.folder:
        return FramesWriter(res, fps, width, height, metadata), frames_message(res.path, fps)
    return VideoWriter(res, fps, width, height, metadata), ""


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, rounded as images are (to_rgb)."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous()


def write_video(reservation: Reservation, video: torch.Tensor, fps, metadata: dict,
                frames_per_write: int = 8) -> str:  # fmt: skip
    """Writes a decoded video (3, T, H, W) in [-1, 1] (on the CPU, any float dtype) into
    the reservation, a few frames at a time (the uint8 copy never holds the whole video),
    and commits it. Returns the fallback message ("" for an MP4)."""
    _, T, H, W = video.shape
    writer, message = open_video(reservation, fps, W, H, metadata)
    with writer:
        for t in range(0, T, frames_per_write):
            writer.write(to_uint8(video[:, t : t + frames_per_write]))
    return message


def parse_ffmetadata(text: str) -> dict[str, str]:
    """The global tags of an ffmetadata file (`ffmpeg -i FILE -f ffmetadata -`): lines
    key=value; `=`, `;`, `#`, `\\` and newline escaped with a backslash; lines starting
    with `;` or `#` are comments; the first [SECTION] ends the global tags."""
    if not text.startswith(";FFMETADATA"):
        raise ValueError("not ffmetadata: no ;FFMETADATA header")
    tags, i = {}, 0
    while i < len(text):
        if text[i] in ";#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end + 1
        elif text[i] == "[":
            break
        elif text[i] == "\n":
            i += 1
        else:
            key, i = _unescape_until(text, i, "=\n")
            value = ""
            if i < len(text) and text[i] == "=":
                value, i = _unescape_until(text, i + 1, "\n")
            tags[key] = value
            i += 1
    return tags


def _unescape_until(text: str, i: int, stops: str) -> tuple[str, int]:
    """text[i:] up to an unescaped character of stops -> (the unescaped part, its end)."""
    out = []
    while i < len(text) and text[i] not in stops:
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out), i


def read_mp4_tags(path) -> dict[str, str]:
    """The global tags of a media file, read by the ffmpeg bundled with imageio-ffmpeg."""
    exe = ffmpeg_exe()
    if exe is None:
        raise OutputError(f"{path}: reading MP4 tags needs ffmpeg; {MP4_HINT}")
    cmd = [exe, "-hide_banner", "-nostdin", "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"]
    run = subprocess.run(cmd, capture_output=True)
    if run.returncode != 0:
        said = run.stderr.decode("utf-8", "replace").strip().splitlines()
        raise OutputError(f"{path}: ffmpeg cannot read it ({said[-1] if said else run.returncode})")
    return parse_ffmetadata(run.stdout.decode("utf-8"))


def read_mp4_metadata(path) -> dict:
    """The settings dict stored as JSON in the MP4's comment tag."""
    tags = read_mp4_tags(path)
    if "comment" not in tags:
        raise OutputError(f"{path}: no settings comment in its tags ({', '.join(tags)})")
    return json.loads(tags["comment"])
