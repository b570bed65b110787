#!/usr/bin/env python3
"""torch_bench.py: the PyTorch baseline for rdnet_bench: timm's RDNet, the same training step
(forward, cross entropy with label smoothing 0.1, backward, AdamW with timm's param groups and
weight decay 0.05) or eval-mode inference, on random images, timed the same way. With --onnx,
inference runs in onnxruntime (CPU) on the model exported by torch.onnx.export.
Not a training run and not part of the test suite: it needs torch and timm (pip install torch timm).

  python3 bench/torch_bench.py --model tiny --batch 8 --res 224 --mode train --threads 2
  python3 bench/torch_bench.py --batch 64 --mode train --device cuda --precision bf16 --channels-last
  python3 bench/torch_bench.py --mode infer --onnx --threads 2
  python3 bench/torch_bench.py --op dwconv7 --batch 8 --res 56 --channels 128 --threads 2

The last line has rdnet_bench's RESULT format with impl, precision and channels_last added:
  RESULT model=tiny mode=train batch=8 res=224 device=cpu img_per_s=X peak_rss_mb=Y peak_gpu_mb=Z \
      impl=torch-2.5.1 precision=fp32 channels_last=0
On CUDA, cudnn.benchmark is on (the warmup iterations pick the kernels) and the AdamW is torch's
default for the device (foreach on CUDA).
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings


def fail(message, code=1):
    print(f"torch_bench: error: {message}", file=sys.stderr)
    sys.exit(code)


try:
    import torch
    import timm
    import timm.optim
except ImportError as e:
    fail(f"{e.name} is not installed: pip install torch timm", 2)


def rdnet_kwargs(name):
    """timm model name and overrides for an rdnet_bench preset (nano is not in timm)."""
    if name != "nano":
        return f"rdnet_{name}", {}
    # examples/rdnet/rdnet.hpp's RDNetConfig::nano(): 1x28x28 images, 10 classes, patch 2 stem.
    return "rdnet_tiny", dict(in_chans=1, num_classes=10, patch_size=2, num_init_features=32,
                              growth_rates=[32, 48, 64, 96], num_blocks_list=[2, 2, 2, 2],
                              block_type=["Block", "Block", "BlockESE", "BlockESE"],
                              is_downsample_block=(None, True, False, True))


def parse_args():
    p = argparse.ArgumentParser(description="PyTorch/timm RDNet throughput, the baseline for rdnet_bench")
    p.add_argument("--model", default="tiny", choices=["tiny", "small", "base", "large", "nano"])
    p.add_argument("--batch", type=int, default=8, help="images per iteration")
    p.add_argument("--res", type=int, default=224, help="image height and width in pixels")
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="fp32; tf32 (CUDA matmul/conv on TF32 tensor cores); bf16 (torch.autocast)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the model and input")
    p.add_argument("--onnx", action="store_true", help="inference in onnxruntime on the CPU instead of torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--op", default="none", choices=["none", "dwconv7", "layernorm2d", "pwconv", "concat"],
                   help="time one op of a dense block on (batch, channels, res, res), as rdnet_bench --op")
    p.add_argument("--channels", type=int, default=128, help="--op: input channels")
    a = p.parse_args()
    for name in ("batch", "res", "iters"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(a, name)}")
    if a.warmup < 0 or a.threads < 0:
        p.error("--warmup and --threads must be >= 0")
    if a.precision == "tf32" and a.device != "cuda":
        p.error("--precision tf32 needs --device cuda (the CPU computes in fp32)")
    if a.onnx and (a.mode != "infer" or a.device != "cpu" or a.precision != "fp32" or a.channels_last):
        p.error("--onnx is CPU fp32 inference: use it with --mode infer --device cpu, no --precision or --channels-last")
    return a


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def export_onnx(model, x, path):
    """torch.onnx.export, with the TorchScript exporter first and the dynamo one if that fails."""
    errors = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"], dynamo=dynamo)
            return
        except Exception as e:  # the exporters raise many kinds; say what each said
            errors.append(f"dynamo={dynamo}: {type(e).__name__}: {e}")
    fail("torch.onnx.export failed (it needs: pip install onnx; the dynamo exporter also onnxscript):\n  " + "\n  ".join(errors))


def run_op(a):
    """--op: the op's forward + backward of a fixed output gradient (train) or forward (infer),
    timed as rdnet_bench --op does."""
    torch.manual_seed(a.seed)
    train = a.mode == "train"
    n, c, r = a.batch, a.channels, a.res

    def param(*shape):
        return torch.randn(*shape).requires_grad_(train)

    x = param(n, c, r, r)
    if a.op == "dwconv7":
        w, b = param(c, 1, 7, 7), param(c)
        forward = lambda: torch.nn.functional.conv2d(x, w, b, padding=3, groups=c)
    elif a.op == "layernorm2d":  # timm's LayerNorm2d: permute, layer_norm over C, permute back
        w, b = param(c), param(c)
        forward = lambda: torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (c,), w, b, 1e-6).permute(0, 3, 1, 2)
    elif a.op == "pwconv":
        w, b = param(4 * c, c, 1, 1), param(4 * c)
        forward = lambda: torch.nn.functional.conv2d(x, w, b)
    else:
        other = param(n, 32, r, r)
        forward = lambda: torch.cat([x, other], 1)
    with torch.no_grad():
        grad_out = torch.randn(forward().shape)

    def step():
        if train:
            forward().backward(grad_out)
        else:
            with torch.no_grad():
                forward()

    print(f"torch_bench: torch-{torch.__version__}: op {a.op}, {'forward + backward' if train else 'forward'}, "
          f"input ({n}, {c}, {r}, {r}), threads {torch.get_num_threads()}, {a.warmup} warmup + {a.iters} timed "
          f"iterations", flush=True)
    for _ in range(a.warmup):
        step()
    ms = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        step()
        ms.append((time.perf_counter() - t0) * 1000.0)
    print(f"torch_bench: per iteration: median {statistics.median(ms):.2f} ms, mean {statistics.fmean(ms):.2f} ms, "
          f"min {min(ms):.2f} ms, max {max(ms):.2f} ms")
    print(f"RESULT model=op:{a.op} mode={a.mode} batch={n} res={r} device=cpu "
          f"img_per_s={n * len(ms) / (sum(ms) / 1000.0):.2f} peak_rss_mb={peak_rss_mb():.1f} peak_gpu_mb=0.0 "
          f"median_ms={statistics.median(ms):.3f} channels={c} impl=torch-{torch.__version__} precision=fp32 "
          f"channels_last=0")


def main():
    a = parse_args()
    if a.op != "none":
        if a.device != "cpu" or a.onnx:
            fail("--op runs on the CPU in torch only (no --device cuda, no --onnx)")
        if a.threads > 0:
            torch.set_num_threads(a.threads)
        return run_op(a)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        fail("--device cuda: torch sees no CUDA device (or this torch is a CPU build)")
    if a.onnx:
        try:
            import onnxruntime as ort
        except ImportError:
            fail("onnxruntime is not installed: pip install onnxruntime onnx", 2)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = a.precision == "tf32"
        torch.backends.cudnn.allow_tf32 = a.precision == "tf32"
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()

    timm_name, overrides = rdnet_kwargs(a.model)
    model = timm.create_model(timm_name, pretrained=False, **overrides)
    in_chans, num_classes = overrides.get("in_chans", 3), model.num_classes
    memory_format = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    train = a.mode == "train"
    model.train(train)

    # One batch of random data on the device, as rdnet_bench: the loop measures the model.
    x = torch.randn(a.batch, in_chans, a.res, a.res, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (a.batch,), device=device)
    params = timm.optim.param_groups_weight_decay(model, weight_decay=0.05)  # no decay on 1-D params
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    autocast = torch.autocast(device_type=a.device, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    impl = f"torch-{torch.__version__}"
    if a.onnx:
        impl = f"onnxruntime-{ort.__version__}"
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rdnet.onnx")
            export_onnx(model.eval(), x, path)
            so = ort.SessionOptions()
            so.intra_op_num_threads = a.threads  # 0: onnxruntime's default
            so.inter_op_num_threads = 1
            session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}

    def step():
        if a.onnx:
            return torch.from_numpy(session.run(None, feed)[0])
        if not train:
            with torch.no_grad(), autocast:
                return model(x)
        with autocast:
            loss = criterion(model(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch_bench: {impl}, timm {timm.__version__}: rdnet {a.model} ({n_params} parameters), {a.mode}, "
          f"batch {a.batch} of {in_chans}x{a.res}x{a.res}, device {a.device}, {a.precision}"
          f"{', channels_last' if a.channels_last else ''}, threads {torch.get_num_threads()}, "
          f"{a.warmup} warmup + {a.iters} timed iterations", flush=True)
    for _ in range(a.warmup):
        step()
    synchronize()
    ms = []
    last = None
    for _ in range(a.iters):
        t0 = time.perf_counter()
        last = step()
        synchronize()
        ms.append((time.perf_counter() - t0) * 1000.0)

    print(f"torch_bench: per iteration: median {statistics.median(ms):.2f} ms, mean {statistics.fmean(ms):.2f} ms, "
          f"min {min(ms):.2f} ms, max {max(ms):.2f} ms")
    total = float(last.float().sum())
    if total != total or abs(total) == float("inf"):
        print(f"torch_bench: warning: the last {'loss' if train else 'output'} is not finite")
    elif train:
        print(f"torch_bench: last loss {total:.4f}")
    img_per_s = a.batch * len(ms) / (sum(ms) / 1000.0)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    print(f"RESULT model={a.model} mode={a.mode} batch={a.batch} res={a.res} device={a.device} "
          f"img_per_s={img_per_s:.2f} peak_rss_mb={peak_rss_mb():.1f} peak_gpu_mb={peak_gpu:.1f} "
          f"impl={impl} precision={a.precision} channels_last={int(a.channels_last)}")


if __name__ == "__main__":
    main()
