"""Batched tensor twin of `rtrain.data.augment.Augmenter`: the same recipe on decoded images already on
a device (CUDA in production, CPU tensors in tests), for the train worker's own decode path.

Inputs (one call = one batch, all images on one device):
- images: list of uint8 [3, H, W] RGB tensors (sizes may differ);
- boxes: list of float32 [M, 4] xyxy in stored-image pixels (continuous: pixel i covers [i, i+1)),
  labels: list of int64 [M], iscrowd: list of bool [M]; any device (box maths runs on the host);
- image_ids, epoch: the keys of `rtrain.data.augment.sample_rng`.

Output: the dict layout of `rtrain.data.batches.collate` on the images' device: images uint8 [B, 3, S, S];
boxes float32 [B, M, 4] input px (0 where padded); labels int64 [B, M] (-1 where padded);
iscrowd bool [B, M]; scale float32 [B]; pad float32 [B, 2] (left, top). M >= 1. Rectangular val
(`rect=True`): images [B, 3, H, W] with (H, W) = `rtrain.data.augment.rect_canvas` of the call's images.
`input = stored * scale + pad` is exact in val mode; in train mode scale/pad describe the letterbox
step only (mosaic: 1 and (0, 0)), as in `Augmenter`.

How: every random parameter is drawn on the host from `sample_rng(seed, epoch, image_id)` in
exactly `Augmenter`'s order, so an image gets the same zoom, shift, mosaic partners, HSV gains
and flip as on the PIL path, and its boxes (host numpy float32, the same arithmetic and the same
min_area_frac / min_side filter) are identical. Pixels: each stored image is resized once by
r = S / max(H, W) (antialiased bilinear with x_out = r * x_in exactly, as PIL's resize with a
box) and pasted into a gray letterbox canvas (S x S) or mosaic canvas (2S x 2S); train mode then
warps each canvas group in one `grid_sample` whose per-image matrix is the random affine with
the flip folded in (x -> S - x), then HSV jitter as batched tensor maths. Each geometric step
uses the continuous convention, so a box still covers its pixels to interpolation blur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rtrain.data.augment import PAD_VALUE, AugmentParams, _box_area, _keep_boxes, rect_canvas, sample_rng


@dataclass
class _Plan:
    """One output image: which canvas it is warped from, and the random parameters for its pixels."""

    mosaic: bool
    tiles: list[tuple[int, int, int]]  # (source index, x origin, y origin) on the canvas
    boxes: np.ndarray  # float32 [M, 4] output px
    labels: np.ndarray
    iscrowd: np.ndarray
    scale: float
    pad: tuple[float, float]
    zoom: float = 1.0  # affine: out = zoom * (in - canvas centre) + (tx, ty), then flip
    shift: tuple[float, float] = (0.0, 0.0)
    flip: bool = False
    hsv: tuple[float, float, float] = (0.0, 0.0, 0.0)  # hue shift (circle fraction), s gain, v gain


def _resized_size(h: int, w: int, r: float) -> tuple[int, int]:
    """(nh, nw) of `rtrain.data.augment._resize_exact`."""
    if r == 1.0:
        return h, w
    return max(1, math.floor(h * r + 1e-6)), max(1, math.floor(w * r + 1e-6))


def resize_exact(images: torch.Tensor, r: float) -> torch.Tensor:
    """[N, C, H, W] (float, or uint8 on CPU) -> [N, C, floor(H r), floor(W r)], x_out = r * x_in exactly
    (antialiased bilinear, PIL's filter): the tensor twin of `rtrain.data.augment._resize_exact`."""
    h, w = images.shape[-2:]
    nh, nw = _resized_size(h, w, r)
    if r == 1.0:
        return images
    # The aten op takes the output size and the scale separately, so the mapping stays exactly r
    # even where floor(W r) / W != r (F.interpolate would derive one from the other).
    return torch.ops.aten._upsample_bilinear2d_aa(images, [nh, nw], False, r, r)


def hsv_jitter_batch(images: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """float RGB [B, 3, H, W] 0..255; gains [B, 3] = (hue shift as a circle fraction, saturation
    gain, value gain): hue + shift, saturation * (1 + gain), value * (1 + gain), clipped.

    The hue shift is scaled by 256/255 as `rtrain.data.augment.hsv_jitter`'s 256-entry LUT on PIL's
    0..255 hue does. Hue is kept in sextants (0..6): max channel k and (next - previous) / chroma
    give it in one pass; back to RGB with the closed form c(n) = V - V S clamp(min(t, 4 - t), 0, 1),
    t = (n + hue) mod 6, n = 5, 3, 1 for R, G, B.
    """
    g = gains.to(images.dtype)
    maxc, k = images.max(1)  # the first maximal channel on ties: R before G before B, as PIL
    chroma = maxc - images.amin(1)
    r, gr, b = images.unbind(1)
    numer = torch.where(k == 0, gr - b, torch.where(k == 1, b - r, r - gr))
    hue = numer.div_(chroma.clamp_min(1e-6)).add_(k.to(images.dtype), alpha=2.0)  # grey: S = 0 anyway
    hue.add_((g[:, 0] * (6.0 * 256.0 / 255.0))[:, None, None])
    sat = chroma.div_(maxc.clamp_min(1e-6)).mul_((1.0 + g[:, 1])[:, None, None]).clamp_(0.0, 1.0)
    val = maxc.mul_((1.0 + g[:, 2])[:, None, None]).clamp_(0.0, 255.0)
    n = torch.arange(5.0, 0.0, -2.0, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)  # R, G, B
    t = torch.remainder(hue[:, None] + n, 6.0)
    weight = torch.minimum(t, 4.0 - t).clamp_(0.0, 1.0)
    return weight.mul_((val * sat)[:, None]).neg_().add_(val[:, None])


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without stalling the host: pinned + non_blocking on CUDA."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _to_numpy(x, dtype, shape) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(shape)


class TensorAugmenter:
    """`Augmenter`'s recipe on a batch of uint8 [3, H, W] tensors; see the module doc.

    train=False: letterbox to `img_size`, centred, gray padding (exact `scale`/`pad`); with
    `rect`, into one `rtrain.data.augment.rect_canvas` (H, W) per call instead of S x S.
    train=True: per image, mosaic (prob `params.mosaic`, partners from the same call) or letterbox,
    random affine, HSV jitter, horizontal flip, each drawn from `sample_rng(seed, epoch, image_id)`.
    """

    uint8_resize_on_cpu = True  # False: the float resize path the CUDA device takes (tests use it)

    def __init__(
        self, img_size: int, train: bool, params: AugmentParams | None = None, seed: int = 0,
        rect: bool = False,
    ) -> None:
        if rect and train:
            raise ValueError("TensorAugmenter: rect=True is for evaluation only (train=False)")
        self.img_size = int(img_size)
        self.train = bool(train)
        self.rect = bool(rect)
        self.canvas = (self.img_size, self.img_size)  # the val canvas (H, W) of the current call
        self.params = params or AugmentParams()
        self.seed = int(seed)

    # ------------------------------------------------------------ host: parameters and boxes

    def _letterbox_plan(self, h: int, w: int, index: int, boxes, labels, crowd,
                        canvas: tuple[int, int] | None = None) -> _Plan:
        size = self.img_size
        r = size / max(h, w)
        nh, nw = _resized_size(h, w, r)
        ch, cw = canvas or (size, size)
        left, top = (cw - nw) // 2, (ch - nh) // 2
        boxes = boxes * np.float32(r) + np.array([left, top, left, top], dtype=np.float32)
        return _Plan(False, [(index, left, top)], boxes, labels, crowd, r, (float(left), float(top)))

    def _mosaic_plan(self, shapes, picks: list[int], rng: np.random.Generator, boxes, labels, crowd):
        """`rtrain.data.augment.mosaic4`'s geometry: tile origins, clipped boxes and their unclipped areas."""
        size = self.img_size
        big = 2 * size
        xc, yc = (int(v) for v in rng.integers(size // 2, big - size // 2 + 1, 2))
        tiles, all_boxes, all_ref = [], [], []
        for i, src in enumerate(picks):
            h, w = shapes[src]
            nh, nw = _resized_size(h, w, size / max(h, w))
            ox = xc - nw if i in (0, 2) else xc  # may be negative: the tile is cut at the canvas edge
            oy = yc - nh if i in (0, 1) else yc
            x1, y1, x2, y2 = max(ox, 0), max(oy, 0), min(ox + nw, big), min(oy + nh, big)
            tiles.append((src, ox, oy))
            r = np.float32(size / max(h, w))
            b = boxes[src] * r + np.array([ox, oy, ox, oy], np.float32)
            all_ref.append(_box_area(b))
            b = np.stack(
                [np.clip(b[:, 0], x1, x2), np.clip(b[:, 1], y1, y2), np.clip(b[:, 2], x1, x2),
                 np.clip(b[:, 3], y1, y2)],
                axis=1,
            )
            all_boxes.append(b.astype(np.float32))
        plan = _Plan(
            True,
            tiles,
            np.concatenate(all_boxes),
            np.concatenate([labels[s] for s in picks]),
            np.concatenate([crowd[s] for s in picks]),
            1.0,
            (0.0, 0.0),
        )
        return plan, np.concatenate(all_ref)

    def _train_plan(self, index, shapes, boxes, labels, crowd, image_id: int, epoch: int) -> _Plan:
        p, size = self.params, self.img_size
        rng = sample_rng(self.seed, epoch, image_id)
        n = len(shapes)
        ref_area = None
        if p.mosaic > 0 and rng.random() < p.mosaic and n > 1:
            others = [i for i in range(n) if i != index]
            picks = rng.choice(others, size=3, replace=len(others) < 3)
            plan, ref_area = self._mosaic_plan(
                shapes, [index] + [int(i) for i in picks], rng, boxes, labels, crowd
            )
            side = 2 * size
        else:
            h, w = shapes[index]
            plan = self._letterbox_plan(h, w, index, boxes[index], labels[index], crowd[index])
            side = size
        # random_affine: same draws, same box arithmetic and filter
        s = rng.uniform(1.0 - p.scale, 1.0 + p.scale)
        tx, ty = rng.uniform(0.5 - p.translate, 0.5 + p.translate, 2) * size
        cx = cy = side / 2.0
        if ref_area is None:
            ref_area = _box_area(plan.boxes)
        a = np.float32(s)
        b = (plan.boxes - np.array([cx, cy, cx, cy], np.float32)) * a + np.array([tx, ty, tx, ty], np.float32)
        b = np.clip(b, 0.0, float(size)).astype(np.float32)
        keep = _keep_boxes(b, ref_area * s * s, p.min_area_frac, p.min_side)
        plan.boxes, plan.labels, plan.iscrowd = b[keep], plan.labels[keep], plan.iscrowd[keep]
        plan.zoom, plan.shift = float(s), (float(tx), float(ty))
        dh, gs, gv = rng.uniform(-1.0, 1.0, 3) * (p.hsv_h, p.hsv_s, p.hsv_v)
        plan.hsv = (float(dh), float(gs), float(gv))
        if rng.random() < p.hflip:
            plan.flip = True
            flipped = plan.boxes.copy()
            flipped[:, 0] = size - plan.boxes[:, 2]
            flipped[:, 2] = size - plan.boxes[:, 0]
            plan.boxes = flipped
        return plan

    def plan(self, shapes, boxes, labels, iscrowd, image_ids, epoch: int) -> list[_Plan]:
        """Per-image geometry and random parameters (host only; `shapes` are (H, W))."""
        if self.train:
            return [
                self._train_plan(i, shapes, boxes, labels, iscrowd, int(image_ids[i]), epoch)
                for i in range(len(shapes))
            ]
        self.canvas = rect_canvas(shapes, self.img_size) if self.rect else (self.img_size, self.img_size)
        return [
            self._letterbox_plan(h, w, i, boxes[i], labels[i], iscrowd[i], self.canvas)
            for i, (h, w) in enumerate(shapes)
        ]

    # ------------------------------------------------------------ device: pixels

    def _resize_all(self, images: list[torch.Tensor], needed: set[int]) -> dict[int, torch.Tensor]:
        """Each needed source image resized by S / max(H, W), equal-sized images in one call.

        CPU: uint8 channels-last in, uint8 out (torch's vectorised antialias kernel; rounds like
        PIL's resize). Elsewhere float (the CUDA antialias kernel has no uint8 version)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i in sorted(needed):
            groups.setdefault(tuple(images[i].shape[-2:]), []).append(i)
        out = {}
        for (h, w), idx in groups.items():
            # stack as [N, H, W, 3]: the NCHW view of that is channels-last, at the cost of one copy
            batch = torch.stack([images[i].permute(1, 2, 0) for i in idx]).permute(0, 3, 1, 2)
            if batch.device.type != "cpu" or not self.uint8_resize_on_cpu:
                batch = batch.float().contiguous()  # NCHW: what the CUDA kernel is written for
            batch = resize_exact(batch, self.img_size / max(h, w))
            for k, i in enumerate(idx):
                out[i] = batch[k]
        return out

    @staticmethod
    def _paste(canvas: torch.Tensor, tile: torch.Tensor, ox: int, oy: int) -> None:
        """canvas[:, oy:oy+h, ox:ox+w] = tile, cut at the canvas edges."""
        side_h, side_w = canvas.shape[-2:]
        h, w = tile.shape[-2:]
        x1, y1, x2, y2 = max(ox, 0), max(oy, 0), min(ox + w, side_w), min(oy + h, side_h)
        if x2 > x1 and y2 > y1:
            canvas[:, y1:y2, x1:x2] = tile[:, y1 - oy : y2 - oy, x1 - ox : x2 - ox]

    def _theta(self, plans: list[_Plan], side: int, device) -> torch.Tensor:
        """affine_grid matrices [n, 2, 3]: output normalized coords -> canvas normalized coords.

        Output x' (px) is the unflipped x = f x' + g ((1, 0), or (-1, S) when flipped); the canvas
        point is x_in = (x - tx) / zoom + c = a x' + b; in [-1, 1] coords (align_corners=False,
        so -1 / +1 are the outer pixel edges) that is n_in = (a S / W) n' + (a S + 2 b) / W - 1.
        """
        size, c = float(self.img_size), side / 2.0
        rows = []
        for p in plans:
            fx, gx = (-1.0, size) if p.flip else (1.0, 0.0)
            ax, bx = fx / p.zoom, (gx - p.shift[0]) / p.zoom + c
            ay, by = 1.0 / p.zoom, -p.shift[1] / p.zoom + c
            rows.append(
                [[ax * size / side, 0.0, (ax * size + 2 * bx) / side - 1.0],
                 [0.0, ay * size / side, (ay * size + 2 * by) / side - 1.0]]
            )
        return to_device_async(torch.tensor(rows, dtype=torch.float32), device)

    def _warp(self, canvases: torch.Tensor, plans: list[_Plan]) -> torch.Tensor:
        """One grid_sample for a canvas group -> float; outside the canvas reads gray (PIL's
        fillcolor): the canvas is sampled around gray so that zero padding is gray."""
        side, size = canvases.shape[-1], self.img_size
        theta = self._theta(plans, side, canvases.device)
        grid = F.affine_grid(theta, [len(plans), 3, size, size], align_corners=False)
        centred = canvases.to(torch.float32).sub_(PAD_VALUE)
        out = F.grid_sample(centred, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.add_(PAD_VALUE)

    def render(self, images: list[torch.Tensor], plans: list[_Plan]) -> torch.Tensor:
        """uint8 [B, 3, S, S] (rect val: [B, 3, H, W], `self.canvas`) for the plans, on their device."""
        size = self.img_size
        device = images[0].device
        needed = {src for p in plans for src, _, _ in p.tiles}
        tiles = self._resize_all(images, needed)
        dtype = next(iter(tiles.values())).dtype  # uint8 on CPU, float elsewhere: see _resize_all
        parts = []
        for is_mosaic in (False, True):
            idx = [i for i, p in enumerate(plans) if p.mosaic == is_mosaic]
            if not idx:
                continue
            side = 2 * size if is_mosaic else size
            ch, cw = (side, side) if self.train else self.canvas
            canvases = torch.full((len(idx), 3, ch, cw), PAD_VALUE, dtype=dtype, device=device)
            for k, i in enumerate(idx):
                for src, ox, oy in plans[i].tiles:
                    self._paste(canvases[k], tiles[src], ox, oy)
            if self.train:
                canvases = self._warp(canvases, [plans[i] for i in idx])
            parts.append((idx, canvases))
        if len(parts) == 1:
            out = parts[0][1]
        else:  # back to input order
            out = torch.empty((len(plans), 3, size, size), dtype=parts[0][1].dtype, device=device)
            for idx, canvases in parts:
                out.index_copy_(0, to_device_async(torch.tensor(idx), device), canvases)
        if out.dtype == torch.uint8:  # val on CPU: letterbox canvases are the output
            return out
        if self.train and any(v != 0 for v in (self.params.hsv_h, self.params.hsv_s, self.params.hsv_v)):
            out = hsv_jitter_batch(out, to_device_async(torch.tensor([p.hsv for p in plans]), device))
        return out.round_().clamp_(0, 255).to(torch.uint8)

    # ------------------------------------------------------------ the call

    def __call__(
        self,
        images: list[torch.Tensor],
        boxes: list,
        labels: list,
        iscrowd: list,
        image_ids: list[int],
        epoch: int = 0,
    ) -> dict[str, torch.Tensor]:
        n = len(images)
        if not n == len(boxes) == len(labels) == len(iscrowd) == len(image_ids):
            raise ValueError(
                f"images/boxes/labels/iscrowd/image_ids lengths differ: {n}/{len(boxes)}/{len(labels)}/"
                f"{len(iscrowd)}/{len(image_ids)}"
            )
        device = images[0].device if n else torch.device("cpu")
        for i, im in enumerate(images):
            if im.dtype != torch.uint8 or im.ndim != 3 or im.shape[0] != 3 or im.device != device:
                raise ValueError(f"images[{i}]: expected uint8 [3, H, W] on {device}, got "
                                 f"{im.dtype} {tuple(im.shape)} on {im.device}")
        shapes = [tuple(int(v) for v in im.shape[-2:]) for im in images]
        np_boxes = [_to_numpy(b, np.float32, (-1, 4)) for b in boxes]
        np_labels = [_to_numpy(x, np.int64, (-1,)) for x in labels]
        np_crowd = [_to_numpy(x, bool, (-1,)) for x in iscrowd]
        for i in range(n):
            if not len(np_boxes[i]) == len(np_labels[i]) == len(np_crowd[i]):
                raise ValueError(f"image {image_ids[i]}: boxes/labels/iscrowd lengths differ")
        plans = self.plan(shapes, np_boxes, np_labels, np_crowd, image_ids, epoch)
        m = max([1] + [len(p.labels) for p in plans])
        out_boxes = np.zeros((n, m, 4), np.float32)
        out_labels = np.full((n, m), -1, np.int64)
        out_crowd = np.zeros((n, m), bool)
        for i, p in enumerate(plans):
            k = len(p.labels)
            out_boxes[i, :k], out_labels[i, :k], out_crowd[i, :k] = p.boxes, p.labels, p.iscrowd
        pixels = self.render(images, plans) if n else torch.zeros((0, 3, *self.canvas), dtype=torch.uint8)

        def put(a: np.ndarray) -> torch.Tensor:
            return to_device_async(torch.from_numpy(a), device)

        return {
            "images": pixels,
            "boxes": put(out_boxes),
            "labels": put(out_labels),
            "iscrowd": put(out_crowd),
            "scale": put(np.asarray([p.scale for p in plans], np.float32).reshape(n)),
            "pad": put(np.asarray([p.pad for p in plans], np.float32).reshape(n, 2)),
        }
