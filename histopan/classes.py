"""The one description of a semantic class, shared by models, stores, metrics and exports.

A :class:`ClassSpec` is a tissue class (``stuff``, one per pixel) or the nucleus class (``thing``), with its
RGB colour and its id: the pixel value of the class in label maps.  A model numbers its classes in the
order of its config (:class:`~histopan.model.config.ModelConfig`), and a store keeps them with their ids.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["BACKGROUND", "ClassSpec", "check_color"]

#: the name of the stuff class of glass and everything that is not tissue (a model's first class); the glass rule
#: paints it outside the tissue region, and QC leaves it out of the tissue area
BACKGROUND = "background"


def check_color(color: tuple[int, ...], what: str) -> None:
    """``ValueError`` unless ``color`` is three integers in 0..255 (``what`` names its owner)."""
    if len(color) != 3 or any(isinstance(c, bool) or not isinstance(c, numbers.Integral) or not 0 <= c <= 255
                              for c in color):
        raise ValueError(f"{what} colour must be three integers in 0..255, got {list(color)}")


@dataclass(frozen=True)
class ClassSpec:
    """One semantic class: ``name``, RGB ``color``, ``kind`` (``"stuff"``: a tissue region, per pixel;
    ``"thing"``: the nucleus class) and ``id``, its pixel value in label maps (0..65535; None until a model
    or a store numbers it).  Invalid values raise ``ValueError`` (a config loader turns it into a
    :class:`~histopan.errors.ConfigError` naming the file)."""

    name: str
    color: tuple[int, int, int]
    kind: Literal["stuff", "thing"] = "stuff"
    id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "color", tuple(self.color))
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a class name must be a non-empty text, got {self.name!r}")
        check_color(self.color, f"class {self.name!r}")
        if self.kind not in ("stuff", "thing"):
            raise ValueError(f"class {self.name!r} kind must be 'stuff' or 'thing', got {self.kind!r}")
        if self.id is not None:
            if isinstance(self.id, bool) or not isinstance(self.id, numbers.Integral) or not 0 <= self.id < 1 << 16:
                raise ValueError(f"class {self.name!r} id must be a whole number in 0..65535, got {self.id!r}")
            object.__setattr__(self, "id", int(self.id))

    def to_json(self) -> dict[str, Any]:
        """The class as a store keeps it: ``{"id", "name", "color", "kind"}``."""
        return {"id": self.id, "name": self.name, "color": list(self.color), "kind": self.kind}
