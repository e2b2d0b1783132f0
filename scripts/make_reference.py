#!/usr/bin/python3
"""Writes loom's PyTorch conformance data to tests/data/ (float64 safetensors files).

Each file holds one case: parameters ("param.<name>"), inputs, upstream gradients, PyTorch's
outputs and every gradient ("grad.<name>"), and metadata naming the layer and its options.
The test suite reads the committed files; it never needs PyTorch.
Usage: /usr/bin/python3 scripts/make_reference.py   (needs Debian's python3-torch)
"""
import itertools, json, pathlib, struct
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data"
DTYPES = {torch.float64: "F64", torch.int64: "I64"}


def save(name, tensors, metadata):
    header, blobs, offset = {"__metadata__": {k: str(v) for k, v in metadata.items()}}, [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous()
        data = t.numpy().tobytes()
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    (OUT / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(text)) + text.encode() + b"".join(blobs))


def recurrent_case(kind, layers, bidirectional, with_lengths, seed):
    torch.manual_seed(seed)
    T, B, I, H = 5, 3, 4, 3
    D = 2 if bidirectional else 1
    cls = {"rnn_tanh": nn.RNN, "rnn_relu": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
    extra = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
    layer = cls(I, H, num_layers=layers, bidirectional=bidirectional, **extra).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(layers * D, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(layers * D, B, H, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4]) if with_lengths else None
    state = (h0, c0) if kind == "lstm" else h0
    if with_lengths:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, final = layer(packed, state)
        out, _ = pad_packed_sequence(out, total_length=T)
    else:
        out, final = layer(x, state)
    h_n, c_n = final if kind == "lstm" else (final, None)
    g_out, g_h = torch.randn_like(out), torch.randn_like(h_n)
    loss = (out * g_out).sum() + (h_n * g_h).sum()
    tensors = {"input": x, "h0": h0, "output": out, "h_n": h_n, "grad_output": g_out, "grad_h_n": g_h}
    if kind == "lstm":
        g_c = torch.randn_like(c_n)
        loss = loss + (c_n * g_c).sum()
        tensors.update({"c0": c0, "c_n": c_n, "grad_c_n": g_c})
    loss.backward()
    for name, p in layer.named_parameters():
        tensors["param." + name] = p
        tensors["grad.param." + name] = p.grad
    tensors["grad.input"], tensors["grad.h0"] = x.grad, h0.grad
    if kind == "lstm":
        tensors["grad.c0"] = c0.grad
    if with_lengths:
        tensors["lengths"] = lengths
    name = f"{kind}_l{layers}{'_bi' if bidirectional else ''}{'_lengths' if with_lengths else ''}"
    save(name, tensors, {"kind": kind, "num_layers": layers, "bidirectional": int(bidirectional),
                         "input_size": I, "hidden_size": H})


def dense_case():
    torch.manual_seed(1)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    save("dense", {"param.weight": layer.weight, "param.bias": layer.bias, "input": x, "output": out,
                   "grad_output": g, "grad.param.weight": layer.weight.grad, "grad.param.bias": layer.bias.grad,
                   "grad.input": x.grad}, {"kind": "dense"})


def loss_cases():
    torch.manual_seed(2)
    N, C = 6, 4
    targets = {-100: torch.tensor([0, 3, 1, -100, 2, 3]), 3: torch.tensor([0, 3, 1, 3, 2, 1])}
    cases = []
    for reduction, smoothing, ignore in itertools.product(["mean", "sum", "none"], [0.0, 0.2], [-100, 3]):
        cases.append((f"cross_entropy_{reduction}_s{int(smoothing * 10)}_i{ignore}", targets[ignore],
                      lambda x, t, r=reduction, s=smoothing, i=ignore: F.cross_entropy(
                          x, t, ignore_index=i, label_smoothing=s, reduction=r),
                      {"reduction": reduction, "label_smoothing": smoothing, "ignore_index": ignore}))
    for reduction in ["mean", "sum", "none"]:
        cases.append((f"nll_loss_{reduction}", targets[-100],
                      lambda x, t, r=reduction: F.nll_loss(F.log_softmax(x, 1), t, reduction=r),
                      {"reduction": reduction, "ignore_index": -100}))
    y = torch.randn(N, C, dtype=torch.float64)
    p = torch.rand(N, C, dtype=torch.float64)
    for reduction in ["mean", "sum", "none"]:
        cases.append((f"mse_loss_{reduction}", targets[-100], lambda x, t, r=reduction: F.mse_loss(x, y, reduction=r),
                      {"reduction": reduction}))
        # logits scaled by 5 so that some are large: the stable formula matters there
        cases.append((f"bce_with_logits_{reduction}", targets[-100],
                      lambda x, t, r=reduction: F.binary_cross_entropy_with_logits(x * 5, p, reduction=r),
                      {"reduction": reduction}))
    for name, target, fn, meta in cases:
        x = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
        out = fn(x, target)
        g = torch.randn_like(out)
        (out * g).sum().backward()
        save("loss_" + name, {"input": x, "target": target, "y": y, "p": p, "output": out, "grad_output": g,
                              "grad.input": x.grad}, {"loss": name.rsplit("_", 3 if name.startswith("cross") else 1)[0], **meta})


def optimizer_cases():
    """Five steps of each optimizer from fixed parameters along a fixed gradient sequence."""
    configs = [
        ("sgd", "SGD", {"lr": 0.1}),
        ("sgd_momentum", "SGD", {"lr": 0.1, "momentum": 0.9}),
        ("sgd_dampening", "SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
        ("sgd_nesterov", "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        ("sgd_weight_decay", "SGD", {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1}),
        ("adam", "Adam", {"lr": 0.01}),
        ("adam_weight_decay", "Adam", {"lr": 0.01, "weight_decay": 0.1}),
        ("adam_amsgrad", "Adam", {"lr": 0.01, "amsgrad": True}),
        ("adam_betas", "Adam", {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6}),
        ("adamw", "AdamW", {"lr": 0.01}),
        ("adamw_amsgrad", "AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
        ("rmsprop", "RMSprop", {"lr": 0.01}),
        ("rmsprop_centered", "RMSprop", {"lr": 0.01, "centered": True}),
        ("rmsprop_momentum", "RMSprop", {"lr": 0.01, "momentum": 0.9}),
        ("rmsprop_all", "RMSprop", {"lr": 0.01, "alpha": 0.9, "centered": True, "momentum": 0.5, "weight_decay": 0.1}),
        ("adagrad", "Adagrad", {"lr": 0.1}),
        ("adagrad_all", "Adagrad", {"lr": 0.1, "lr_decay": 0.1, "weight_decay": 0.1, "initial_accumulator_value": 0.5}),
        ("sgd_groups", "SGD", [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.01}]),
        ("adam_lr_change", "Adam", {"lr": 0.01}),
    ]
    for name, cls, options in configs:
        torch.manual_seed(3)
        params = [torch.randn(3, 2, dtype=torch.float64, requires_grad=True),
                  torch.randn(4, dtype=torch.float64, requires_grad=True)]
        tensors = {f"init.{k}": p.detach().clone() for k, p in enumerate(params)}
        if isinstance(options, list):
            opt = getattr(torch.optim, cls)([{"params": [params[0]], **options[0]}, {"params": [params[1]], **options[1]}])
        else:
            opt = getattr(torch.optim, cls)(params, **options)
        meta = {"optimizer": cls, "groups": len(opt.param_groups), "steps": 5}
        if name == "adam_lr_change":
            meta.update({"lr_change_step": 3, "lr_change_to": 0.05})
        for g, group in enumerate(opt.param_groups):
            for key in ("lr", "momentum", "dampening", "nesterov", "weight_decay", "eps", "amsgrad", "alpha",
                        "centered", "lr_decay", "initial_accumulator_value"):
                if key in group:
                    meta[f"group{g}.{key}"] = float(group[key]) if not isinstance(group[key], bool) else int(group[key])
            if "betas" in group:
                meta[f"group{g}.beta1"], meta[f"group{g}.beta2"] = group["betas"]
        for t in range(meta["steps"]):
            if t == meta.get("lr_change_step"):
                opt.param_groups[0]["lr"] = meta["lr_change_to"]
            for k, p in enumerate(params):
                p.grad = torch.randn_like(p)
                tensors[f"grad.{t}.{k}"] = p.grad.clone()
            opt.step()
            for k, p in enumerate(params):
                tensors[f"param.{t}.{k}"] = p.detach().clone()
        save("optim_" + name, tensors, meta)


def clip_cases():
    """Clipping of fixed gradients; the arguments travel in the metadata (clip, max_norm, norm_type, clip_value)."""
    for name, args in [("norm2", {"clip": "norm", "max_norm": 1.0, "norm_type": 2.0}),
                       ("norm_inf", {"clip": "norm", "max_norm": 1.0, "norm_type": float("inf")}),
                       ("norm_large", {"clip": "norm", "max_norm": 1000.0, "norm_type": 2.0}),
                       ("value", {"clip": "value", "clip_value": 0.5})]:
        torch.manual_seed(4)
        params = [torch.zeros(3, 2, dtype=torch.float64, requires_grad=True),
                  torch.zeros(4, dtype=torch.float64, requires_grad=True)]
        tensors = {}
        for k, p in enumerate(params):
            p.grad = torch.randn_like(p) * 3
            tensors[f"grad.{k}"] = p.grad.clone()
        if args["clip"] == "norm":
            total = torch.nn.utils.clip_grad_norm_(params, args["max_norm"], norm_type=args["norm_type"])
        else:
            total = torch.nn.utils.clip_grad_value_(params, args["clip_value"])
        for k, p in enumerate(params):
            tensors[f"clipped.{k}"] = p.grad.clone()
        if total is not None:
            tensors["total_norm"] = total.detach().reshape(())
        save("clip_" + name, tensors, args)


def schedule_cases():
    metrics = [1.0, 0.9, 0.95, 0.95, 0.96, 0.97, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    """Twelve steps of each schedule; its class and arguments travel in the metadata."""
    cases = [("step", "StepLR", {"step_size": 3, "gamma": 0.5}),
             ("exponential", "ExponentialLR", {"gamma": 0.9}),
             ("cosine", "CosineAnnealingLR", {"T_max": 5, "eta_min": 0.001}),
             ("linear", "LinearLR", {"start_factor": 0.25, "end_factor": 1.0, "total_iters": 4}),
             ("plateau", "ReduceLROnPlateau", {"factor": 0.5, "patience": 2, "cooldown": 1, "threshold": 0.01})]
    for name, cls, args in cases:
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([p], lr=0.1)
        sched = getattr(torch.optim.lr_scheduler, cls)(opt, **args)
        lrs = [opt.param_groups[0]["lr"]]
        for t in range(len(metrics)):
            opt.step()
            sched.step(metrics[t]) if name == "plateau" else sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        save("schedule_" + name, {"lrs": torch.tensor(lrs, dtype=torch.float64),
                                  "metrics": torch.tensor(metrics, dtype=torch.float64)},
             {"schedule": name, "class": cls, "lr": 0.1, **args})


def min_g(v):
    """Feng et al.'s g: v + 1/2 for v >= 0, sigmoid(v) below."""
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def min_log_g(v):
    return torch.where(v >= 0, (F.relu(v) + 0.5).log(), -F.softplus(-v))


def parallel_scan_log(log_a, log_b, log_h0):
    """Feng et al.'s scan (Heinsen 2023): log h_t for h_t = a_t h_{t-1} + b_t, time on dim 0, by
    cumulative sums rather than a loop."""
    if log_h0 is not None:
        log_a = torch.cat([torch.zeros_like(log_a[:1]), log_a])
        log_b = torch.cat([log_h0[None], log_b])
    a_star = torch.cumsum(log_a, dim=0)
    log_h = a_star + torch.logcumsumexp(log_b - a_star, dim=0)
    return log_h[1:] if log_h0 is not None else log_h


def min_rnn_case(kind, log_space, with_h0, seed):
    """minGRU and minLSTM as Feng et al. write them (2024, appendix), with nn.Linear maps named as
    theirs; the log form by their parallel scan, the plain form by a loop over steps. loom takes
    h0 as the state itself (their code puts it through g first)."""
    torch.manual_seed(seed)
    T, B, I, H = 6, 3, 4, 5
    names = ["linear_z", "linear_h"] if kind == "mingru" else ["linear_f", "linear_i", "linear_h"]
    maps = {n: nn.Linear(I, H).double() for n in names}
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = None
    if with_h0:
        h0 = (torch.rand(1, B, H, dtype=torch.float64) + 0.1) if log_space else torch.randn(1, B, H, dtype=torch.float64)
        h0.requires_grad_()
    pre = maps["linear_h"](x)
    if kind == "mingru":
        k = maps["linear_z"](x)
        if log_space:
            log_a, log_b = -F.softplus(k), -F.softplus(-k) + min_log_g(pre)
        else:
            z = torch.sigmoid(k)
            a, b = 1 - z, z * pre
    else:
        kf, ki = maps["linear_f"](x), maps["linear_i"](x)
        if log_space:
            diff = F.softplus(-kf) - F.softplus(-ki)
            log_a, log_b = -F.softplus(diff), -F.softplus(-diff) + min_log_g(pre)
        else:
            f, i = torch.sigmoid(kf), torch.sigmoid(ki)
            a, b = f / (f + i), i / (f + i) * pre
    if log_space:
        out = parallel_scan_log(log_a, log_b, h0[0].log() if with_h0 else None).exp()
    else:
        h, steps = h0[0] if with_h0 else torch.zeros(B, H, dtype=torch.float64), []
        for t in range(T):
            h = a[t] * h + b[t]
            steps.append(h)
        out = torch.stack(steps)
    h_n = out[-1:]
    g_out, g_h = torch.randn_like(out), torch.randn_like(h_n)
    ((out * g_out).sum() + (h_n * g_h).sum()).backward()
    tensors = {"input": x, "output": out, "h_n": h_n, "grad_output": g_out, "grad_h_n": g_h, "grad.input": x.grad}
    if with_h0:
        tensors.update({"h0": h0, "grad.h0": h0.grad})
    for n, m in maps.items():
        for p_name, p in m.named_parameters():
            tensors[f"param.{n}.{p_name}"] = p
            tensors[f"grad.param.{n}.{p_name}"] = p.grad
    name = f"minrnn_{kind}_{'log' if log_space else 'plain'}{'_h0' if with_h0 else ''}"
    save(name, tensors, {"kind": kind, "log_space": int(log_space), "input_size": I, "hidden_size": H})


def ssm_case(with_state, seed):
    """Mamba's block (Gu & Dao 2023) as its reference module computes it without the CUDA
    kernels: in_proj, a depthwise nn.Conv1d padded by d_conv - 1 and cut, SiLU, x_proj, dt_proj,
    softplus, and the selective scan as a loop over steps; time-major here."""
    torch.manual_seed(seed)
    T, B, d_model, N, K, expand = 6, 2, 4, 3, 3, 2
    E, R = expand * d_model, (d_model + 15) // 16
    in_proj = nn.Linear(d_model, 2 * E, bias=False).double()
    conv1d = nn.Conv1d(E, E, K, groups=E, padding=K - 1).double()
    x_proj = nn.Linear(E, R + 2 * N, bias=False).double()
    dt_proj = nn.Linear(R, E).double()
    out_proj = nn.Linear(E, d_model, bias=False).double()
    A_log = torch.log(torch.arange(1, N + 1, dtype=torch.float64)).repeat(E, 1) + 0.1 * torch.randn(E, N, dtype=torch.float64)
    A_log.requires_grad_()
    D = (torch.ones(E, dtype=torch.float64) + 0.1 * torch.randn(E, dtype=torch.float64)).requires_grad_()
    x = torch.randn(T, B, d_model, dtype=torch.float64, requires_grad=True)
    conv0 = torch.randn(K - 1, B, E, dtype=torch.float64, requires_grad=True) if with_state else None
    ssm0 = torch.randn(B, E, N, dtype=torch.float64, requires_grad=True) if with_state else None
    xs, z = in_proj(x).chunk(2, dim=2)
    if with_state:
        # Earlier inputs take the padding's place: convolve them with the sequence, cut the start.
        full = torch.cat([conv0, xs], 0).permute(1, 2, 0)  # [B, E, K - 1 + T]
        c = conv1d(full)[:, :, K - 1:K - 1 + T]
    else:
        c = conv1d(xs.permute(1, 2, 0))[:, :, :T]
    u = F.silu(c.permute(2, 0, 1))  # [T, B, E]
    dt_in, Bm, Cm = x_proj(u).split([R, N, N], dim=2)
    delta = F.softplus(dt_proj(dt_in))
    A = -torch.exp(A_log)
    h = ssm0 if with_state else torch.zeros(B, E, N, dtype=torch.float64)
    ys = []
    for t in range(T):
        h = torch.exp(delta[t][:, :, None] * A) * h + (delta[t] * u[t])[:, :, None] * Bm[t][:, None, :]
        ys.append((h * Cm[t][:, None, :]).sum(2))
    y = (torch.stack(ys) + u * D) * F.silu(z)
    out = out_proj(y)
    conv_n = torch.cat([conv0 if with_state else torch.zeros(K - 1, B, E, dtype=torch.float64), xs], 0)[T:]
    g_out, g_conv, g_ssm = torch.randn_like(out), torch.randn_like(conv_n), torch.randn_like(h)
    ((out * g_out).sum() + (conv_n * g_conv).sum() + (h * g_ssm).sum()).backward()
    tensors = {"input": x, "output": out, "conv_n": conv_n, "ssm_n": h, "grad_output": g_out, "grad_conv_n": g_conv,
               "grad_ssm_n": g_ssm, "grad.input": x.grad}
    if with_state:
        tensors.update({"conv0": conv0, "ssm0": ssm0, "grad.conv0": conv0.grad, "grad.ssm0": ssm0.grad})
    params = {"A_log": A_log, "D": D}
    for prefix, m in [("in_proj", in_proj), ("conv1d", conv1d), ("x_proj", x_proj), ("dt_proj", dt_proj),
                      ("out_proj", out_proj)]:
        for p_name, p in m.named_parameters():
            params[f"{prefix}.{p_name}"] = p
    for name, p in params.items():
        tensors["param." + name], tensors["grad.param." + name] = p, p.grad
    save(f"ssm_{'state' if with_state else 'zeros'}", tensors,
         {"d_model": d_model, "d_state": N, "d_conv": K, "expand": expand})


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    dense_case()
    seed = 10
    for kind, layers, bidirectional, with_lengths in itertools.product(
            ["rnn_tanh", "rnn_relu", "lstm", "gru"], [1, 2], [False, True], [False, True]):
        recurrent_case(kind, layers, bidirectional, with_lengths, seed)
        seed += 1
    loss_cases()
    optimizer_cases()
    clip_cases()
    schedule_cases()
    for kind, log_space, with_h0 in itertools.product(["mingru", "minlstm"], [True, False], [False, True]):
        min_rnn_case(kind, log_space, with_h0, seed)
        seed += 1
    for with_state in [False, True]:
        ssm_case(with_state, seed)
        seed += 1
    # How many cases of each family there are, so the tests notice a file gone missing.
    counts = {}
    for f in OUT.glob("*.safetensors"):
        family = f.stem.split("_")[0]
        counts[family] = counts.get(family, 0) + 1
    (OUT / "manifest.json").write_text(json.dumps(dict(sorted(counts.items())), indent=1) + "\n")
    print(f"wrote {sum(counts.values())} files to {OUT}: {counts}")


if __name__ == "__main__":
    main()
