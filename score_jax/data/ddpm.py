"""DDPM-generated training data: an .npz with `image` (uint8 N,H,W,C) and `label` arrays.

`np.load(mmap_mode=...)` does not memory-map the members of an .npz, so for members stored
uncompressed (`np.savez`) we find the member's data in the zip file and `np.memmap` it after
its .npy header; compressed members (`np.savez_compressed`) are read into memory.

A memory map bypasses the zip CRC, so stored members are checked against it once: the result
is cached beside the file (`<path>.verified`, keyed by the file's size and mtime), so a 3 GB file
is read in full only on the first start after it changes. Compressed members are CRC-checked by
zipfile as they are read.

A gs:// path is copied to local disk once per host (`score_jax.data.remote`, checked against the
object's MD5) and memory-mapped from there; errors name the gs:// path.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib

import numpy as np
from absl import logging
from numpy.lib import format as npy_format

from score_jax.data import Split, remote
from score_jax.errors import DataError

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # A zip local file header (30 bytes).
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"
_CRC_CHUNK = 1 << 24
VERIFIED_SUFFIX = ".verified"


def _read_npy_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(fp)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(fp)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(fp)
    # Version 3.0 (utf8 field names) has no public reader; 1.0/2.0 cover numeric arrays.
    raise DataError(f"unsupported .npy format version {version}")


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Offset in the file of a stored member's bytes (after its zip local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_HEADER_MAGIC:
        raise DataError("bad zip local file header")
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


class _Member:
    """One array of the npz: header read, data not yet."""

    def __init__(self, path: str, archive: zipfile.ZipFile, key: str):
        self.path, self.key = path, key
        self.info = archive.getinfo(f"{key}.npy")
        with archive.open(self.info) as fp:
            self.shape, self.fortran_order, self.dtype = _read_npy_header(fp)
            self.header_size = fp.tell()
        self.stored = self.info.compress_type == zipfile.ZIP_STORED
        if self.dtype.hasobject:
            raise DataError(
                "has dtype object (pickled Python objects, expected numeric arrays); refused "
                "without unpickling it"
            )
        expected = self.header_size + int(np.prod(self.shape)) * self.dtype.itemsize
        if self.stored and expected != self.info.file_size:
            raise DataError(
                f"its .npy header claims shape {self.shape} ({expected} bytes with the header), "
                f"but the member holds {self.info.file_size} bytes"
            )

    def crc_ok(self) -> bool:
        """Whether the stored member's bytes match the zip directory's CRC-32."""
        offset = _member_data_offset(self.path, self.info)
        crc, left = 0, self.info.compress_size
        with open(self.path, "rb") as f:
            f.seek(offset)
            while left > 0:
                chunk = f.read(min(_CRC_CHUNK, left))
                if not chunk:
                    return False
                crc = zlib.crc32(chunk, crc)
                left -= len(chunk)
        return crc == self.info.CRC

    def load(self, archive: zipfile.ZipFile) -> np.ndarray:
        if self.stored:
            offset = _member_data_offset(self.path, self.info) + self.header_size
            return np.memmap(
                self.path,
                dtype=self.dtype,
                mode="r",
                offset=offset,
                shape=self.shape,
                order="F" if self.fortran_order else "C",
            )
        with archive.open(self.info) as fp:
            return npy_format.read_array(fp, allow_pickle=False)


def _verify_stored(path: str, members: dict[str, _Member], where: str) -> None:
    """CRC-checks the stored members, unless `<path>.verified` records that this file (same size
    and mtime, same CRCs) already passed."""
    stat = os.stat(path)
    record = {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "crc32": {k: m.info.CRC for k, m in sorted(members.items()) if m.stored},
    }
    if not record["crc32"]:
        return
    cache = path + VERIFIED_SUFFIX
    try:
        with open(cache) as f:
            if json.load(f) == record:
                return
    except (OSError, ValueError):
        pass
    for key, member in members.items():
        if member.stored and not member.crc_ok():
            raise DataError(
                f"{where}: field {key!r} fails its zip CRC-32 check (the file is corrupt; "
                "regenerate or copy it again)"
            )
    tmp = f"{cache}.tmp-{os.getpid()}"  # every host may write it: atomically
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, cache)
    except OSError as e:  # a read-only data directory: verified again on the next start
        logging.warning("Cannot record the CRC check in %s (%s)", cache, e.strerror)


def load_generated(
    path: str, num_classes: int, image_shape: tuple[int, int, int] | tuple[int, ...]
) -> Split:
    """Loads (memory-maps when stored uncompressed) and validates DDPM data.

    Raises ValueError, one line naming the file and the field, on any problem; nothing is
    returned half-validated.
    """
    image_shape = tuple(image_shape)
    where = f"DDPM data {path!r} (config.dataset.ddpm_path)"
    if remote.is_remote(path):
        path = remote.fetch(path, "DDPM data, config.dataset.ddpm_path")
    if not os.path.isfile(path):
        raise DataError(f"{where}: file not found")
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{where}: not a readable .npz ({e})") from None
    with archive:
        names = set(archive.namelist())
        members = {}
        for key in ("image", "label"):
            if f"{key}.npy" not in names:
                keys = sorted(n.removesuffix(".npy") for n in names)
                raise DataError(f"{where}: missing key {key!r} (has {keys})")
            try:
                members[key] = _Member(path, archive, key)
            except (ValueError, OSError, zipfile.BadZipFile) as e:
                raise DataError(f"{where}: field {key!r}: {e}") from None
        image, label = members["image"], members["label"]

        if len(image.shape) != 1 + len(image_shape) or image.shape[1:] != image_shape:
            raise DataError(
                f"{where}: field 'image' has shape {image.shape}, expected (N, "
                f"{', '.join(map(str, image_shape))})"
            )
        if image.dtype != np.uint8:
            raise DataError(f"{where}: field 'image' has dtype {image.dtype}, expected uint8")
        if image.shape[0] == 0:
            raise DataError(f"{where}: field 'image' is empty")
        if not np.issubdtype(label.dtype, np.integer):
            raise DataError(f"{where}: field 'label' has dtype {label.dtype}, expected integer")
        if label.shape != image.shape[:1]:
            raise DataError(
                f"{where}: field 'label' has shape {label.shape}, expected ({image.shape[0]},) "
                "to match 'image'"
            )

        _verify_stored(path, members, where)
        try:
            labels = label.load(archive)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{where}: field 'label': {e}") from None
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{where}: field 'label' has values in [{lo}, {hi}], outside [0, {num_classes})"
            )
        labels = np.asarray(labels, dtype=np.int32)  # Small: kept in memory.
        try:
            images = image.load(archive)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{where}: field 'image': {e}") from None
        if not image.stored:
            logging.warning(
                "%s: 'image' is compressed, so it was read into memory (%.1f GB); save it "
                "with np.savez (not np.savez_compressed) to memory-map it instead.",
                where,
                images.nbytes / 1e9,
            )
    return Split(images, labels)
