"""Qwen-VL grounding markup in an answer, as structured boxes.

Qwen-VL-Chat answers a grounding request with ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>``
(and, for text regions, ``<quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>``), corners on a 0..1000
grid of the image. :func:`parse_grounding` turns that into :class:`GroundingBox` objects:

- several boxes right after one ref share its phrase; the phrase stops at the next ref or at any
  other text than separators (spaces, commas, 、, ;, "and"/"和"/"及"); a box without a ref has
  phrase ``None``;
- malformed markup (unclosed tags, wrong number of points, non-numbers) is skipped, never raised;
- pixels are computed like the official ``draw_bbox_on_latest_picture``: ``int(x / 1000 * w)``,
  ``int(y / 1000 * h)``, then clamped to the image (0..w, 0..h).

Which picture the boxes refer to (:func:`referred_picture`): the latest picture of the
conversation, unless the last user message names one ("Picture 2", "image 2", "图2", "图片二",
"第二张"); then the last such mention. This needs no torch.

With the answer's logprobs, :func:`score_boxes` gives each box a ``score``: how sure the model was
of the tokens that wrote it.

Exports for annotation tools: :func:`coco_annotations` (``bbox=[x, y, w, h]`` in pixels, and the
box's ``score`` when known) and :func:`label_studio_prediction` (``rectanglelabels`` /
``polygonlabels`` in percent, with ``score`` per region and for the prediction when known).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

GRID = 1000

_TAG = re.compile(r"<ref>([^<]*)</ref>|<box>([^<]*)</box>|<quad>([^<]*)</quad>")
_POINT = r"\(\s*(\d{1,7})\s*,\s*(\d{1,7})\s*\)"
_POINTS = re.compile(rf"\s*{_POINT}(?:\s*,\s*{_POINT})*\s*")
_ONE_POINT = re.compile(_POINT)
# Text allowed between boxes of one ref without ending the phrase.
_SEPARATOR = re.compile(r"[\s,，、;；]*(?:(?:and|和|及|与)[\s,，、;；]*)?", re.IGNORECASE)


@dataclass(frozen=True)
class GroundingBox:
    """One ``<box>`` or ``<quad>`` of an answer.

    ``points`` are on the 0..1000 grid: two corners for a box, four for a quad.
    ``picture`` is the 1-based picture of the conversation it refers to; ``image_size`` that
    picture's (width, height) when known, which enables the pixel forms.
    """

    phrase: str | None
    kind: Literal["box", "quad"]
    points: tuple[tuple[int, int], ...]
    picture: int | None = None
    image_size: tuple[int, int] | None = None
    # With the answer's logprobs: how sure the model was of this box (see score_boxes).
    score: float | None = None
    # Where the box's markup sits in the answer text: [start, end) characters.
    span: tuple[int, int] | None = field(default=None, compare=False)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Bounding rectangle on the grid: (x1, y1, x2, y2) with x1 <= x2, y1 <= y2."""
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def points_pixels(self) -> tuple[tuple[int, int], ...] | None:
        """``points`` in pixels of the image (None when its size is unknown)."""
        if self.image_size is None:
            return None
        w, h = self.image_size
        return tuple((_to_pixels(x, w), _to_pixels(y, h)) for x, y in self.points)

    @property
    def box_pixels(self) -> tuple[int, int, int, int] | None:
        """Bounding rectangle in pixels (None when the image size is unknown)."""
        pts = self.points_pixels
        if pts is None:
            return None
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return min(xs), min(ys), max(xs), max(ys)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in a result's ``boxes``."""
        pts = self.points_pixels
        out = {
            "phrase": self.phrase,
            "kind": self.kind,
            "picture": self.picture,
            "box": list(self.box),
            "points": [list(p) for p in self.points],
            "image_size": list(self.image_size) if self.image_size else None,
            "box_pixels": list(self.box_pixels) if pts else None,
            "points_pixels": [list(p) for p in pts] if pts else None,
        }
        if self.score is not None:
            out["score"] = self.score
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroundingBox:
        """Inverse of :meth:`to_dict`."""
        size = data.get("image_size")
        return cls(
            phrase=data.get("phrase"),
            kind=data["kind"],
            points=tuple((int(x), int(y)) for x, y in data["points"]),
            picture=data.get("picture"),
            image_size=(int(size[0]), int(size[1])) if size else None,
            score=data.get("score"),
        )

    def with_image(self, picture: int | None, image_size: tuple[int, int] | None) -> GroundingBox:
        return replace(self, picture=picture, image_size=image_size)


def _to_pixels(v: int, size: int) -> int:
    return min(max(int(v / GRID * size), 0), size)


def parse_grounding(
    text: str, *, picture: int | None = None, image_size: tuple[int, int] | None = None
) -> list[GroundingBox]:
    """Every well-formed box and quad in ``text``, in order, tagged with ``picture``/``image_size``."""
    boxes: list[GroundingBox] = []
    phrase: str | None = None
    end = 0
    for m in _TAG.finditer(text):
        if phrase is not None and not _SEPARATOR.fullmatch(text, end, m.start()):
            phrase = None  # other text came between the ref's boxes and this tag
        end = m.end()
        ref, box, quad = m.groups()
        if ref is not None:
            phrase = ref.strip() or None
            continue
        kind: Literal["box", "quad"] = "box" if box is not None else "quad"
        points = _parse_points(box if box is not None else quad, 2 if kind == "box" else 4)
        if points is not None:
            boxes.append(GroundingBox(phrase, kind, points, picture, image_size, span=(m.start(), m.end())))
    return boxes


def score_boxes(boxes: Sequence[GroundingBox], tokens: Sequence[tuple[int, int, float]]) -> list[GroundingBox]:
    """``boxes`` with their :attr:`~GroundingBox.score`: the geometric mean of the probabilities
    of the answer tokens that wrote the box's markup, ``exp(mean logprob)``, in (0, 1].

    ``tokens`` are ``(start, end, logprob)`` per answer token, ``[start, end)`` the characters of
    the answer it produced (a token whose bytes finish a character later has an empty span). A
    box without a span, or that no token covers, keeps ``score`` None.
    """
    out = []
    for box in boxes:
        if box.span is None:
            out.append(box)
            continue
        start, end = box.span
        out.append(replace(box, score=mean_probability([lp for a, b, lp in tokens if a < end and b > start])))
    return out


def mean_probability(logprobs: Sequence[float]) -> float | None:
    """The geometric mean of the probabilities of tokens with these log-probabilities,
    ``exp(mean logprob)``, in (0, 1], to six places (None for no tokens)."""
    return round(math.exp(sum(logprobs) / len(logprobs)), 6) if logprobs else None


def _parse_points(inner: str, count: int) -> tuple[tuple[int, int], ...] | None:
    if not _POINTS.fullmatch(inner):
        return None
    points = tuple((int(x), int(y)) for x, y in _ONE_POINT.findall(inner))
    return points if len(points) == count else None


# -- which picture ------------------------------------------------------------------------------

_CN_DIGITS = {"一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_NUM = r"(\d{1,3}|[一二两三四五六七八九十]{1,3})"
_MENTION = re.compile(
    rf"(?:picture|image|photo|pic|img)\s*#?\s*{_NUM}(?![\d])"
    rf"|(?:图片|图像|照片|图)\s*{_NUM}"
    rf"|第\s*{_NUM}\s*(?:张|幅|个图|副)",
    re.IGNORECASE,
)


def _number(word: str) -> int | None:
    if word.isdigit():
        return int(word)
    if word == "十":
        return 10
    if "十" in word:  # 十一 = 11, 二十 = 20, 二十六 = 26
        tens, _, ones = word.partition("十")
        t = _CN_DIGITS.get(tens, 1 if tens == "" else 0)
        o = _CN_DIGITS.get(ones, 0) if ones else 0
        return t * 10 + o if t and (ones == "" or o) else None
    return _CN_DIGITS.get(word) if len(word) == 1 else None


def mentioned_picture(text: str, n_pictures: int) -> int | None:
    """The last picture number (1..n_pictures) that ``text`` names, else None."""
    found = None
    for m in _MENTION.finditer(text):
        n = _number(next(g for g in m.groups() if g))
        if n is not None and 1 <= n <= n_pictures:
            found = n
    return found


def referred_picture(request: Any) -> int | None:
    """The 1-based picture an answer's boxes refer to (None when there is no picture).

    ``request`` is a :class:`producer.schema.ChatRequest`. The last user message's text may name
    a picture; otherwise it is the latest picture of the conversation.
    """
    n_pictures = len(request.image_urls)
    if n_pictures == 0:
        return None
    last_user = next(m for m in reversed(request.messages) if m.role == "user")
    text = " ".join(p.text for p in last_user.parts if getattr(p, "type", None) == "text")
    return mentioned_picture(text, n_pictures) or n_pictures


def ground_answer(answer: str, request: Any, image_sizes: Sequence[tuple[int, int]]) -> list[GroundingBox]:
    """Boxes of ``answer`` mapped onto the picture they refer to.

    ``image_sizes[k]`` is picture ``k + 1``'s (width, height), in conversation order.
    """
    picture = referred_picture(request)
    size = image_sizes[picture - 1] if picture is not None and picture <= len(image_sizes) else None
    return parse_grounding(answer, picture=picture, image_size=size)


# -- exports ------------------------------------------------------------------------------------

DEFAULT_LABEL = "object"


def coco_annotations(
    boxes: Sequence[GroundingBox],
    *,
    image_id: int | str,
    categories: dict[str, int],
    first_id: int = 1,
) -> list[dict[str, Any]]:
    """COCO ``annotations`` for boxes with a known image size.

    ``categories`` maps a phrase to its category id; unseen phrases are added to it (ids
    continue after the largest), a box without phrase gets :data:`DEFAULT_LABEL`. Quads also
    carry their polygon as ``segmentation``. Boxes without an image size are skipped.
    """
    out = []
    for b in boxes:
        pixels = b.box_pixels
        if pixels is None:
            continue
        label = b.phrase or DEFAULT_LABEL
        if label not in categories:
            categories[label] = max(categories.values(), default=0) + 1
        x1, y1, x2, y2 = pixels
        ann: dict[str, Any] = {
            "id": first_id + len(out),
            "image_id": image_id,
            "category_id": categories[label],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": (x2 - x1) * (y2 - y1),
            "iscrowd": 0,
        }
        if b.kind == "quad":
            ann["segmentation"] = [[c for p in b.points_pixels or () for c in p]]
        if b.score is not None:
            ann["score"] = b.score
        out.append(ann)
    return out


def coco_categories(categories: dict[str, int]) -> list[dict[str, Any]]:
    """COCO ``categories`` list from the phrase -> id map :func:`coco_annotations` filled."""
    return [{"id": i, "name": name, "supercategory": "object"}
            for name, i in sorted(categories.items(), key=lambda kv: kv[1])]


def label_studio_prediction(
    boxes: Sequence[GroundingBox],
    *,
    model_version: str = "qwen-vl-chat",
    from_name: str = "label",
    to_name: str = "image",
) -> dict[str, Any]:
    """A Label Studio prediction: ``rectanglelabels`` for boxes, ``polygonlabels`` for quads.

    Coordinates are percent of the image, straight from the 0..1000 grid (x / 10).
    """
    results = []
    for i, b in enumerate(boxes):
        label = [b.phrase or DEFAULT_LABEL]
        item: dict[str, Any] = {"id": f"box{i}", "from_name": from_name, "to_name": to_name}
        if b.image_size:
            item["original_width"], item["original_height"] = b.image_size
            item["image_rotation"] = 0
        if b.kind == "box":
            x1, y1, x2, y2 = (min(max(v, 0), GRID) for v in b.box)  # grid units: differences stay exact
            item["type"] = "rectanglelabels"
            item["value"] = {"x": x1 / 10, "y": y1 / 10, "width": (x2 - x1) / 10, "height": (y2 - y1) / 10,
                             "rotation": 0, "rectanglelabels": label}
        else:
            points = [[min(max(x, 0), GRID) / 10, min(max(y, 0), GRID) / 10] for x, y in b.points]
            item["type"] = "polygonlabels"
            item["value"] = {"points": points, "polygonlabels": label}
        if b.score is not None:
            item["score"] = b.score
        results.append(item)
    prediction: dict[str, Any] = {"model_version": model_version, "result": results}
    scores = [b.score for b in boxes if b.score is not None]
    if scores:
        prediction["score"] = round(sum(scores) / len(scores), 6)  # the task's: its boxes' mean
    return prediction
