"""The abstract syntax tree of KQL: what the user wrote, with positions.

Nodes are frozen dataclasses. The tree holds only what the text says: an omitted clause
is ``None`` here, and the logical planner fills in the defaults. Every node carries
``pos`` (1-based line and column of its first token), so later stages can point errors at
the text.

>>> q = Occlude(image=SampleImage("chelsea"), model=ModelName("net"), patch=(8, 8))
>>> [type(n).__name__ for n in q.walk()]
['Occlude', 'SampleImage', 'ModelName']
>>> q.replace(patch=(4, 4)).patch
(4, 4)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple, Union


@dataclass(frozen=True)
class Pos:
    line: int
    column: int


NOWHERE = Pos(0, 0)


@dataclass(frozen=True)
class Node:
    """Base node: knows how to walk and copy itself; subclasses only declare fields."""

    def children(self) -> Iterator["Node"]:
        """Fields that are nodes, and the nodes inside tuple fields (a list of images)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Node):
                yield value
            elif isinstance(value, tuple):
                yield from (item for item in value if isinstance(item, Node))

    def walk(self) -> Iterator["Node"]:
        """Pre-order traversal of this node and its descendants."""
        yield self
        for child in self.children():
            yield from child.walk()

    def replace(self, **changes) -> "Node":
        return dataclasses.replace(self, **changes)


# -- images -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageName(Node):
    """An image registered in the catalog (``LOAD IMAGE`` or ``register_image``)."""
    name: str
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class ImageFile(Node):
    """A quoted path to an image file."""
    path: str
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class SampleImage(Node):
    """``sample('<skimage.data name>')``."""
    name: str
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class ImageGlob(Node):
    """A quoted glob pattern (``'cats/*.png'``): every matching file, in sorted order."""
    pattern: str
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


ImageRef = Union[ImageName, ImageFile, SampleImage]


# -- models -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelName(Node):
    """A catalog name, a torchvision builder name or the built-in ``efficientnet_lite0``."""
    name: str
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


# -- targets, colours, regions ---------------------------------------------------------

@dataclass(frozen=True)
class TargetPredicted(Node):
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class TargetIndex(Node):
    index: int
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class TargetLabel(Node):
    label: str
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class TargetList(Node):
    """``TARGET (3, 'tabby', PREDICTED)``: one map per class, from one scan."""
    targets: Tuple[Union[TargetPredicted, TargetIndex, TargetLabel], ...]
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class TargetTop(Node):
    """``TARGET TOP k``: the k classes most likely on the unoccluded image."""
    k: int
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


Target = Union[TargetPredicted, TargetIndex, TargetLabel, TargetList, TargetTop]


@dataclass(frozen=True)
class ColorNamed(Node):
    """``black``, ``gray`` (or ``grey``, stored as ``gray``), ``white``, ``mean`` (the
    image's per-channel mean), ``mean_patch`` (the per-channel mean of the image under each
    patch) or ``gaussian`` (the image under each patch times 1 - a Gaussian)."""
    name: str
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class ColorRGB(Node):
    """``(r, g, b)`` in pixel space, as written (range checked by the planner)."""
    r: float
    g: float
    b: float
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class ColorValue(Node):
    """``(v)``: one value, a grey image's (in [0, 1]) or a volume's (its own intensities)."""
    value: float
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


Color = Union[ColorNamed, ColorRGB, ColorValue]


class Same(tuple):
    """A PATCH or STRIDE written as one number: the same size on every axis (a square on
    an image, a cube on a volume). Equal to the plain tuple."""


@dataclass(frozen=True)
class Region(Node):
    """``REGION (x, y, w, h)``: columns x..x+w-1 and rows y..y+h-1 of the model input; a
    volume's ``(x, y, z, w, h, d)`` adds slices z..z+d-1."""
    x: int
    y: int
    w: int
    h: int
    z: Optional[int] = None
    d: Optional[int] = None
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)

    @property
    def numbers(self) -> tuple:
        """As written: (x, y, w, h) or (x, y, z, w, h, d)."""
        if self.z is None:
            return (self.x, self.y, self.w, self.h)
        return (self.x, self.y, self.z, self.w, self.h, self.d)


# -- statements ---------------------------------------------------------------------------

class ClausePositions:
    """For statements that keep ``clause_pos``: where each clause keyword was written."""

    def pos_of(self, clause: str) -> Pos:
        """Position of a clause keyword ('patch', 'stride', ...) or of the statement."""
        return dict(self.clause_pos).get(clause, self.pos)


@dataclass(frozen=True)
class Occlude(ClausePositions, Node):
    """``OCCLUDE <image> USING <model> [clauses]``; omitted clauses are None."""
    image: ImageRef
    model: ModelName
    target: Optional[Target] = None
    patch: Optional[Tuple[int, ...]] = None        # (height, width); a volume's (depth, height, width)
    stride: Optional[Tuple[int, ...]] = None       # (rows, columns); a volume's (slices, rows, columns)
    color: Optional[Color] = None
    region: Optional[Region] = None
    ssim: Optional[float] = None                   # WITH SSIM >= value
    drilldown: Optional[float] = None              # DRILLDOWN fraction
    speedup: Optional[float] = None                # DRILLDOWN fraction SPEEDUP factor
    device: Optional[str] = None                   # 'cpu' | 'gpu' | 'auto'
    batch: Optional[int] = None
    into: Optional[str] = None
    resize: Optional[str] = None                   # 'squash' | 'crop' | 'pad'
    output: Optional[str] = None                   # 'softmax' | 'sigmoid' | 'logits' | 'probability'
    ray: bool = False                              # ON RAY: run as a Ray Data pipeline
    where: Optional[Tuple[str, str, Union[float, str]]] = None  # WHERE column op value (many images)
    order: Optional[Tuple[str, bool]] = None       # ORDER BY column, descending?
    limit: Optional[int] = None                    # LIMIT n
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)
    # Positions of individual clauses (keyword token), for pointing errors at them.
    clause_pos: Tuple[Tuple[str, Pos], ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Explain(Node):
    """``EXPLAIN [ANALYZE] <statement>``."""
    statement: Occlude
    analyze: bool = False
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class LoadModel(Node):
    """``LOAD MODEL <name> FROM '<file>' [ARCH <arch>] [LABELS '<file>'] [TRUSTED]``.

    ``arch`` as written: a torchvision builder (``resnet18``), ``timm:<name>``, or the
    quoted factory of the user's own code (``package.module:factory``); None: the file
    says what it is (ONNX, TorchScript) or the model's name is the builder. ``trusted``:
    the user lets the file's own code run (a TorchScript archive is code).
    """
    name: str
    path: str
    arch: Optional[str] = None
    labels: Optional[str] = None
    trusted: bool = False
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class LoadImage(Node):
    """``LOAD IMAGE <name> FROM '<file>'``."""
    name: str
    path: str
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class LoadImages(Node):
    """``LOAD IMAGES <name> FROM '<glob>'``: an image table, one row per matching file."""
    name: str
    pattern: str
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class ShowSettings(Node):
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class ShowModels(Node):
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class ShowImages(Node):
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class SetOption(Node):
    """``SET <name> = <value>``: a session setting (e.g. ``SET strategy = 'naive'``)."""
    name: str
    value: Union[str, int, float]
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class Calibrate(Node):
    """``CALIBRATE [ON CPU | ON GPU]``: re-measure the cost model's device throughput."""
    device: Optional[str] = None
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True)
class CalibrateModel(ClausePositions, Node):
    """``CALIBRATE <model> ON (<image>, ...) | '<glob>' [PATCH] [STRIDE] [COLOR]``: tune the
    model's projective-field threshold on sample images.

    ``images`` holds the images as written (a glob is one :class:`ImageGlob`); PATCH,
    STRIDE and COLOR mean what they mean in OCCLUDE, and omitted ones are None.
    """
    model: ModelName
    images: Tuple[Union[ImageName, ImageFile, SampleImage, ImageGlob], ...]
    patch: Optional[Tuple[int, int]] = None        # (height, width)
    stride: Optional[Tuple[int, int]] = None       # (rows, columns)
    color: Optional[Color] = None
    pos: Pos = field(default=NOWHERE, compare=False, repr=False)
    clause_pos: Tuple[Tuple[str, Pos], ...] = field(default=(), compare=False, repr=False)


Statement = Union[Occlude, Explain, LoadModel, LoadImage, LoadImages, ShowModels, ShowImages,
                  ShowSettings, SetOption, Calibrate, CalibrateModel]
