"""An independent functional re-statement of the official MTLoRA forward pass, for tests.

It reads an official-layout state dict (names as scale-lab/MTLoRA saves them) and
computes the outputs with plain tensor ops, following the official modules:
blocks then patch merging per stage, MTLoRALinear in `matrix`/`matrixv2` mode,
task streams from the last block of each stage, per-task downsamplers and HRNet
heads. It shares no code with `mtlora.model`. The fixture proves it right; it
then serves as the reference for configurations the fixture does not cover.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _lin(sd, prefix, x, x_tasks=None, tasks=None, mode="matrix", shared_scale=4.0, task_scales=None):
    """Official MTLoRALinear / plain Linear. Returns (shared, task dict or None)."""
    if f"{prefix}.linear.weight" not in sd:  # CompatLinear
        return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias")), None
    pre = F.linear(x, sd[f"{prefix}.linear.weight"], sd.get(f"{prefix}.linear.bias"))
    lora = (x @ sd[f"{prefix}.lora_shared_A"].T @ sd[f"{prefix}.lora_shared_B"].T) * shared_scale
    outs = None
    if tasks and f"{prefix}.lora_tasks_A.{tasks[0]}" in sd:
        outs = {}
        for t in tasks:
            xt = x if x_tasks is None else x_tasks[t]
            term = xt @ sd[f"{prefix}.lora_tasks_A.{t}"].T @ sd[f"{prefix}.lora_tasks_B.{t}"].T * task_scales[t]
            outs[t] = pre + (lora if mode == "matrixv2" else 0) + term
    return pre + lora, outs


def _window_partition(x, ws):
    B, H, W, C = x.shape
    return x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws, ws, C)


def _window_reverse(w, ws, H, W):
    B = int(w.shape[0] / (H * W / ws / ws))
    return w.view(B, H // ws, W // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)


def _rel_index(ws):
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def _mask(H, ws, shift):
    img = torch.zeros(1, H, H, 1)
    cnt = 0
    for h in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for w in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, h, w, :] = cnt
            cnt += 1
    mw = _window_partition(img, ws).view(-1, ws * ws)
    m = mw.unsqueeze(1) - mw.unsqueeze(2)
    return m.masked_fill(m != 0, -100.0).masked_fill(m == 0, 0.0)


def _ln(sd, prefix, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], 1e-5)


def _block(sd, p, x, H, heads, ws, shift, tasks, mode, s_scale, t_scales, last):
    B, L, C = x.shape
    shortcut = x
    h = _ln(sd, f"{p}.norm1", x).view(B, H, H, C)
    if shift:
        h = torch.roll(h, (-shift, -shift), (1, 2))
    win = _window_partition(h, ws).view(-1, ws * ws, C)
    Bw, N, _ = win.shape
    qkv, _ = _lin(sd, f"{p}.attn.qkv", win, shared_scale=s_scale)
    qkv = qkv.reshape(Bw, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (C // heads) ** -0.5, qkv[1], qkv[2]
    attn = q @ k.transpose(-2, -1)
    table = sd[f"{p}.attn.relative_position_bias_table"]
    attn = attn + table[_rel_index(ws).view(-1)].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
    if shift:
        m = _mask(H, ws, shift)
        nW = m.shape[0]
        attn = (attn.view(Bw // nW, nW, heads, N, N) + m.unsqueeze(1).unsqueeze(0)).view(-1, heads, N, N)
    a = (attn.softmax(-1) @ v).transpose(1, 2).reshape(Bw, N, C)
    task_kw = dict(tasks=tasks if last else None, mode=mode, shared_scale=s_scale, task_scales=t_scales)
    a, a_tasks = _lin(sd, f"{p}.attn.proj", a, **task_kw)

    def unwindow(t):
        t = _window_reverse(t.view(-1, ws, ws, C), ws, H, H)
        if shift:
            t = torch.roll(t, (shift, shift), (1, 2))
        return t.reshape(B, H * H, C)

    x = shortcut + unwindow(a)
    x_tasks = {t: shortcut + unwindow(v) for t, v in a_tasks.items()} if a_tasks else None
    n2 = _ln(sd, f"{p}.norm2", x)
    h1, h1_tasks = _lin(sd, f"{p}.mlp.fc1", n2, {t: _ln(sd, f"{p}.norm2", v) for t, v in x_tasks.items()} if x_tasks else None, **task_kw)
    h1 = F.gelu(h1)
    h1_tasks = {t: F.gelu(v) for t, v in h1_tasks.items()} if h1_tasks else None
    h2, h2_tasks = _lin(sd, f"{p}.mlp.fc2", h1, h1_tasks, **task_kw)
    out_tasks = None
    if h2_tasks:
        out_tasks = {t: (x_tasks[t] if x_tasks else 0) + h2_tasks[t] for t in tasks}
    return x + h2, out_tasks


def _merge(sd, p, x, H, s_scale):
    B, L, C = x.shape
    x = x.view(B, H, H, C)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(B, -1, 4 * C)
    return _lin(sd, f"{p}.reduction", _ln(sd, f"{p}.norm", x), shared_scale=s_scale)[0]


@torch.no_grad()
def official_forward(sd: dict, cfg: dict, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """cfg: img, patch, embed, depths, heads, window, tasks, mode, shared_scale, task_scale, mtlora(bool)."""
    tasks, mode = cfg["tasks"], cfg["mode"]
    x = F.conv2d(image, sd["backbone.patch_embed.proj.weight"], sd["backbone.patch_embed.proj.bias"], stride=cfg["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = _ln(sd, "backbone.patch_embed.norm", x)
    res = cfg["img"] // cfg["patch"]
    stages = []
    for i, depth in enumerate(cfg["depths"]):
        ws = min(cfg["window"], res)
        shift_base = 0 if res <= cfg["window"] else cfg["window"] // 2
        t_scales = {t: cfg["task_scale"] for t in tasks}
        streams = None
        for j in range(depth):
            x, streams = _block(sd, f"backbone.layers.{i}.blocks.{j}", x, res, cfg["heads"][i], ws,
                                0 if j % 2 == 0 else shift_base, tasks, mode, cfg["shared_scale"], t_scales,
                                last=cfg["mtlora"] and j == depth - 1)
        if i < len(cfg["depths"]) - 1:
            p = f"backbone.layers.{i}.downsample"
            x_next = _merge(sd, p, x, res, cfg["shared_scale"])
            streams = {t: _merge(sd, p, v, res, cfg["shared_scale"]) for t, v in streams.items()} if streams else None
            x = x_next
            res //= 2
        stages.append(streams if streams else {t: x for t in tasks})
    outs = {}
    for t in tasks:
        feats = []
        for k, st in enumerate(stages):
            f = st[t]
            side = int(f.shape[1] ** 0.5)
            f = f.view(f.shape[0], side, side, -1).permute(0, 3, 1, 2)
            feats.append(F.conv2d(f, sd[f"downsampler.{t}.downsample_{k}.weight"]))
        size = feats[0].shape[-2:]
        cat = torch.cat([feats[0]] + [F.interpolate(f, size, mode="bilinear") for f in feats[1:]], 1)
        p = f"decoders.decoders.{t}.last_layer"
        h = F.conv2d(cat, sd[f"{p}.0.weight"], sd[f"{p}.0.bias"])
        h = F.batch_norm(h, sd[f"{p}.1.running_mean"], sd[f"{p}.1.running_var"], sd[f"{p}.1.weight"], sd[f"{p}.1.bias"])
        h = F.conv2d(F.relu(h), sd[f"{p}.3.weight"], sd[f"{p}.3.bias"])
        outs[t] = F.interpolate(h, (cfg["img"], cfg["img"]), mode="bilinear")
    return outs
