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
    # How many cases of each family there are, so the tests notice a file gone missing.
    counts = {}
    for f in OUT.glob("*.safetensors"):
        family = f.stem.split("_")[0]
        counts[family] = counts.get(family, 0) + 1
    (OUT / "manifest.json").write_text(json.dumps(dict(sorted(counts.items())), indent=1) + "\n")
    print(f"wrote {sum(counts.values())} files to {OUT}: {counts}")


if __name__ == "__main__":
    main()
