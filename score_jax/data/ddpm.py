"""DDPM-generated training data: an .npz with `image` (uint8 N,H,W,C) and `label` arrays.

`np.load(mmap_mode=...)` does not memory-map the members of an .npz, so for members stored
uncompressed (`np.savez`) we find the member's data in the zip file and `np.memmap` it after
its .npy header; compressed members (`np.savez_compressed`) are read into memory.
"""

from __future__ import annotations

import os
import struct
import zipfile

import numpy as np
from absl import logging
from numpy.lib import format as npy_format

from score_jax.data import Split

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # A zip local file header (30 bytes).
_LOCAL_HEADER_MAGIC = b"PK\x03\x04"


def _read_npy_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(fp)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(fp)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(fp)
    # Version 3.0 (utf8 field names) has no public reader; 1.0/2.0 cover numeric arrays.
    raise ValueError(f"unsupported .npy format version {version}")


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Offset in the file of a stored member's bytes (after its zip local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_HEADER_MAGIC:
        raise ValueError("bad zip local file header")
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


def load_generated(
    path: str, num_classes: int, image_shape: tuple[int, int, int] | tuple[int, ...]
) -> Split:
    """Loads (memory-maps when stored uncompressed) and validates DDPM data.

    Raises ValueError, one line naming the file and the field, on any problem; nothing is
    returned half-validated.
    """
    image_shape = tuple(image_shape)
    where = f"DDPM data {path!r} (config.dataset.ddpm_path)"
    if not os.path.isfile(path):
        raise ValueError(f"{where}: file not found")
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{where}: not a readable .npz ({e})") from None
    with archive:
        names = set(archive.namelist())
        members = {}
        for key in ("image", "label"):
            if f"{key}.npy" not in names:
                keys = sorted(n.removesuffix(".npy") for n in names)
                raise ValueError(f"{where}: missing key {key!r} (has {keys})")
            try:
                members[key] = _Member(path, archive, key)
            except ValueError as e:
                raise ValueError(f"{where}: field {key!r}: {e}") from None
        image, label = members["image"], members["label"]

        if len(image.shape) != 1 + len(image_shape) or image.shape[1:] != image_shape:
            raise ValueError(
                f"{where}: field 'image' has shape {image.shape}, expected (N, "
                f"{', '.join(map(str, image_shape))})"
            )
        if image.dtype != np.uint8:
            raise ValueError(f"{where}: field 'image' has dtype {image.dtype}, expected uint8")
        if image.shape[0] == 0:
            raise ValueError(f"{where}: field 'image' is empty")
        if not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"{where}: field 'label' has dtype {label.dtype}, expected integer")
        if label.shape != image.shape[:1]:
            raise ValueError(
                f"{where}: field 'label' has shape {label.shape}, expected ({image.shape[0]},) "
                "to match 'image'"
            )

        labels = label.load(archive)
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{where}: field 'label' has values in [{lo}, {hi}], outside [0, {num_classes})"
            )
        labels = np.asarray(labels, dtype=np.int32)  # Small: kept in memory.
        images = image.load(archive)
        if not image.stored:
            logging.warning(
                "%s: 'image' is compressed, so it was read into memory (%.1f GB); save it "
                "with np.savez (not np.savez_compressed) to memory-map it instead.",
                where,
                images.nbytes / 1e9,
            )
    return Split(images, labels)
