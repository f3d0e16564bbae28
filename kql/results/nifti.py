"""A volume's occlusion map as NIfTI: the scan's affine with each map cell at its patch's
centre, so the map opens over the scan in any viewer (ITK-SNAP, 3D Slicer, FSLeyes).

>>> a = map_affine(np.eye(4), patch=(3, 3, 3), stride=(2, 2, 2))
>>> (a @ [1, 2, 0, 1]).tolist()     # cell (1, 2, 0): the patch from voxel (2, 4, 0), centre +1
[3.0, 5.0, 1.0, 1.0]
"""

from __future__ import annotations

import numpy as np

from ..errors import KqlExecutionError
from ..fileio import atomic_write


def map_affine(affine, patch, stride, offset=(0, 0, 0)) -> np.ndarray:
    """The affine of an occlusion map whose cell (a, b, c) is the patch from voxel
    ``(offset + (a, b, c)) * stride`` along (i, j, k): the world point of a cell is its
    patch's centre, ``first voxel + (patch - 1) / 2``.

    >>> map_affine(np.diag([2.0, 2.0, 3.0, 1.0]), (4, 4, 2), (4, 4, 2), (1, 0, 0)).tolist()
    [[8.0, 0.0, 0.0, 11.0], [0.0, 8.0, 0.0, 3.0], [0.0, 0.0, 6.0, 1.5], [0.0, 0.0, 0.0, 1.0]]
    """
    stride, patch = np.asarray(stride, np.float64), np.asarray(patch, np.float64)
    cells = np.diag(np.append(stride, 1.0))
    cells[:3, 3] = np.asarray(offset, np.float64) * stride + (patch - 1) / 2
    return np.asarray(affine, np.float64) @ cells


def write_nifti(path: str, values, affine) -> str:
    """Write a map ``values [D', H', W']`` (float32) with its ``affine`` as a NIfTI-1
    ``.nii`` or ``.nii.gz`` (by the name), atomically; qform and sform both the affine
    (codes 1, scanner), as nibabel's ``set_qform``/``set_sform`` set them."""
    import nibabel

    lower = path.lower()
    ending = ".nii.gz" if lower.endswith(".nii.gz") else ".nii" if lower.endswith(".nii") else None
    if ending is None:
        raise KqlExecutionError(f"cannot write '{path}': a NIfTI map is named .nii or .nii.gz")
    values, affine = np.asarray(values, np.float32), np.asarray(affine, np.float64)
    if values.ndim != 3 or affine.shape != (4, 4):
        raise KqlExecutionError(f"cannot write '{path}': a NIfTI map is 3D values and a 4x4 affine "
                                f"(got {values.shape} and {affine.shape})")
    image = nibabel.Nifti1Image(values, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    try:
        atomic_write(path, lambda tmp: nibabel.save(image, tmp), mode=None, suffix=ending)
    except OSError as exc:
        raise KqlExecutionError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return path
