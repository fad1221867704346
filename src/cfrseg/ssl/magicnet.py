"""MagicNet (Chen et al., CVPR 2023) as a re-training method, and CFR_MagicNet (its SAM pseudo-label term).

One iteration on a batch of ``B = B_l + B_u`` patches (labeled first), grid (nx, ny, nz) of cubes (magicnet.md 3.4):

1. plain forward ``out = S(X)``;
2. cross-image partition and recovery: per cube position a random permutation of the batch mixes the cubes
   across samples (:func:`cfrseg.ssl.cubes.mix`), the student embeds the mixed batch, the embeddings are put
   back (:func:`~cfrseg.ssl.cubes.unmix`, the exact inverse) and classified: ``out_unmix``;
3. teacher: the EMA teacher on the noisy unlabeled patches gives logits ``T`` and ``PL_t = argmax T``;
4. within-image partition: every patch is cut into its cubes, encoded, and the bottleneck features of each
   sample's cubes go through the location head; ``L_loc`` = cross-entropy against the cube position
   p = x + nx y + nx ny z, averaged over samples;
5. within-image recovery: the decoded cube embeddings are put back in place (:func:`~cfrseg.ssl.cubes.recover`,
   the exact inverse of the cut) and classified: ``P_within``;
6. cube-wise pseudo-label blending (after ``magic_blend_start`` iterations): class weights
   w_k = n_k^(1/T) / max_j n_j^(1/T) from the pseudo-label voxel counts of the last ``magic_blend_window``
   iterations; per voxel w = w[PL_t]; ``PL = argmax((1 - w) T + w P_within_u)``; before that PL = PL_t;
7. ``L = L_sup + magic_loc_weight L_loc + w_cons(t) L_cons (+ w_pl(t) L_pl)`` with
   ``L_sup = [CE(out_l) + Dice(out_l) + Dice(out_unmix_l) + Dice(P_within_l)] / 4``,
   ``L_cons = Dice(softmax out_unmix_u, PL)`` and, for CFR_MagicNet, ``L_pl = 0.5 (CE + Dice)(out_u, SAM label)``
   on the plain forward of the un-noised, un-mixed unlabeled patches (as for MT).

Differences from the official code are deliberate and listed in docs/retrain.md ("MagicNet").
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cfrseg.config import require
from cfrseg.errors import ConfigError
from cfrseg.ssl.cubes import location_targets, mix, partition, random_perms, recover, unmix
from cfrseg.ssl.losses import dice_loss
from cfrseg.ssl.methods import Batch, SSLMethod, SSLParams, TeacherFn

MAGIC_BASES = ("vnet", "tiny")   # networks ssl='magicnet' extends with its cube-location head


def _is_int(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def check_config(cfg: Any, p: str = "retrain") -> None:
    """ConfigError unless the MagicNet settings of a :class:`cfrseg.stages.retrain.RetrainConfig` fit its
    network and patch."""
    from cfrseg.models.magic import cube_shape

    require(cfg.network in MAGIC_BASES, f"{p}.network must be a V-Net ({list(MAGIC_BASES)}) for ssl='magicnet' "
            f"(MagicNet adds its cube-location head to it), got {cfg.network!r}")
    g = cfg.magic_grid
    require(g is None or (isinstance(g, tuple) and len(g) == 3 and all(_is_int(v, 1) for v in g)),
            f"{p}.magic_grid must be null (auto) or three positive integers, got {g!r}")
    grid = cfg.cube_grid()
    cube = cube_shape(cfg.patch, grid)
    require(grid[0] * grid[1] * grid[2] >= 2, f"{p}.magic_grid {grid} must hold at least 2 cubes")
    if cfg.magic_transposed_recovery:
        require(grid[0] == grid[2] and cube[0] == cube[2],
                f"{p}.magic_transposed_recovery needs equal x and z grids and cube sides, got grid {grid}")
    require(_is_int(cfg.magic_fc_hidden, 1), f"{p}.magic_fc_hidden must be an integer >= 1")
    require(_is_int(cfg.magic_blend_start, 0), f"{p}.magic_blend_start must be an integer >= 0")
    require(_is_int(cfg.magic_blend_window, 1), f"{p}.magic_blend_window must be an integer >= 1")
    for name, lo_open in (("magic_loc_weight", False), ("magic_blend_T", True)):
        v = getattr(cfg, name)
        require(isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if lo_open else v >= 0),
                f"{p}.{name} must be a number {'> 0' if lo_open else '>= 0'}, got {v!r}")


def magic_network(network: str, network_kwargs: Mapping[str, Any], patch: Sequence[int], grid: Sequence[int],
                  fc_hidden: int) -> tuple[str, dict[str, Any]]:
    """Registry name and options of the V-Net ``network`` with MagicNet's location head (``vnet_magic``)."""
    kw = dict(network_kwargs)
    if network == "tiny":
        kw.setdefault("n_filters", 2)
    kw.setdefault("normalization", "batchnorm")   # the configured V-Net's default, not VNetMagic's
    kw.update(patch=list(patch), grid=list(grid), fc_hidden=fc_hidden)
    return "vnet_magic", kw


def _layout(t: torch.Tensor) -> torch.Tensor:
    """Channels-last-3D on CPU (oneDNN's fast layout for 3D convolutions), unchanged elsewhere."""
    return t.contiguous(memory_format=torch.channels_last_3d) if t.device.type == "cpu" else t


class MagicNet(SSLMethod):
    """MagicNet's losses; the student must be a :class:`cfrseg.models.magic.VNetMagic` (``--ssl magicnet``
    builds one from the configured V-Net)."""

    name = "magicnet"
    uses_unlabeled = True
    uses_teacher = True
    custom_step = True

    def __init__(self, params: SSLParams) -> None:
        super().__init__(params)
        self.grid = tuple(params.magic_grid)
        self.counts: torch.Tensor | None = None     # pseudo-label voxel counts of the running window (K,)
        self.dist: torch.Tensor | None = None       # class weights w_k of the last full window (K,)

    # --- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"counts": None if self.counts is None else self.counts.tolist(),
                "dist": None if self.dist is None else self.dist.tolist()}

    def load_state_dict(self, state: dict) -> None:
        c, d = state.get("counts"), state.get("dist")
        self.counts = None if c is None else torch.tensor(c, dtype=torch.float64)
        self.dist = None if d is None else torch.tensor(d, dtype=torch.float64)

    def class_weights(self, counts: torch.Tensor) -> torch.Tensor:
        """w_k = n_k^(1/T) normalised to sum 1, then divided by its maximum (the most frequent class gets 1)."""
        d = counts.double().clamp_min(0) ** (1.0 / self.p.magic_blend_T)
        d = d / d.sum().clamp_min(1e-12)
        return d / d.max().clamp_min(1e-12)

    def _count(self, pl: torch.Tensor, step: int) -> None:
        k = self.p.num_classes
        c = torch.bincount(pl.reshape(-1).cpu(), minlength=k)[:k].double()
        self.counts = c if self.counts is None else self.counts + c
        if step % self.p.magic_blend_window == 0:   # as the official: refresh after iterations 0, 20, 40, ...
            self.dist = self.class_weights(self.counts)
            self.counts = None

    # --- one step ---------------------------------------------------------------------------------------
    def step_loss(self, student, x: torch.Tensor, n_labeled: int, teacher_fn: TeacherFn, batch: Batch,
                  step: int) -> Batch:
        net = student
        if not all(hasattr(net, a) for a in ("encode", "decode", "head", "locate")):
            raise ConfigError("ssl='magicnet' needs a network with a cube-location head (VNetMagic)")
        grid, nl, b = self.grid, n_labeled, x.shape[0]
        n = grid[0] * grid[1] * grid[2]
        y = batch["label_l"]
        dev = x.device

        out = net(x).float()                                            # 1. plain forward
        out_l, out_u = out[:nl], out[nl:]

        perms = random_perms(b, grid, device=dev)                       # 2. cross-image mix / recover
        _, emb_mix = net.decode(net.encode(_layout(mix(x, perms, grid))))
        out_unmix = net.head(_layout(unmix(emb_mix, perms, grid))).float()

        t_u = teacher_fn(x[nl:], noise=True).float()                    # 3. teacher

        # 4-5. within-image: cubes, location, recovery. Cubes narrower than 48 voxels in x or y reach the
        # network's deepest level at < 3 voxels, where oneDNN's bf16 weight gradient is wrong: run them in fp32
        small = min(x.shape[2] // grid[0], x.shape[3] // grid[1]) < 48
        with torch.autocast(dev.type, enabled=False) if small else contextlib.nullcontext():
            feats = net.encode(_layout(partition(x, grid)))
            target = location_targets(1, grid, device=dev)
            loc_terms, hits = [], 0
            for i in range(b):
                logits = net.locate(feats[-1][i * n:(i + 1) * n]).float()
                loc_terms.append(F.cross_entropy(logits, target))
                hits += int((logits.detach().argmax(1) == target).sum())
            loc = torch.stack(loc_terms).mean()
            _, emb_cubes = net.decode(feats)
            emb_within = recover(emb_cubes, grid, transposed=self.p.magic_transposed_recovery)
            p_within = net.head(_layout(emb_within)).float()

        with torch.no_grad():                                           # 6. cube-wise pseudo-label blending
            pl_t = t_u.argmax(1)
            blend = self.dist is not None and step > self.p.magic_blend_start
            if blend:
                w = self.dist.to(device=dev, dtype=t_u.dtype)[pl_t].unsqueeze(1)
                pl = ((1.0 - w) * t_u + w * p_within[nl:].detach()).argmax(1)
            else:
                pl = pl_t
            self._count(pl, step)

        sup = (F.cross_entropy(out_l, y) + dice_loss(torch.softmax(out_l, 1), y)      # 7. losses
               + dice_loss(torch.softmax(out_unmix[:nl], 1), y)
               + dice_loss(torch.softmax(p_within[:nl], 1), y)) / 4.0
        cons = dice_loss(torch.softmax(out_unmix[nl:], 1), pl)
        w_cons = self.consistency_weight(step)
        d: Batch = {"sup": sup, "cons": cons, "loc": loc,
                    "w_cons": torch.tensor(w_cons, device=dev),
                    "loc_acc": torch.tensor(hits / (b * n), device=dev),
                    "blend": torch.tensor(float(blend), device=dev),
                    "pl_agree": (pl == pl_t).float().mean()}
        total = sup + self.p.magic_loc_weight * loc + w_cons * cons
        pl_term = self.pl_term(out_u, batch, step, d)
        if pl_term is not None:
            total = total + pl_term
        d["loss"] = total
        return d
