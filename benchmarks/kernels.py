"""Kernel throughput: classreg.kernels next to scipy.ndimage / SimpleITK and a plain memory copy, in one run.

    python -m benchmarks.kernels [--sizes 128 192] [--repeat 5] [--threads N] [--out DIR] [--docs PATH]

For each kernel and cube size (float32) it reports the median wall time, Mvoxel/s, the effective bandwidth (GB/s of
the bytes the kernel must at least read and write), the speed-up over the peer measured in the same run, and the
ratio to the memory-copy bound (time the machine needs just to move those bytes at the best copy bandwidth measured
here: ``numpy.copyto`` or a numba-parallel copy, whichever is faster). Writes JSON and a markdown table into
``benchmarks/results/`` (not committed); ``--docs PATH`` also renders the page docs/benchmarks-kernels.md (the
table, the machine, and each target checked against the measured rows).

Targets (issue "Foundation II"): linear 3-D warp ≥ 5× ``scipy.ndimage.map_coordinates(order=1)`` and ≥ SimpleITK
``Resample`` with a displacement field (same thread count); Gaussian smoothing ≥ 2× ``scipy.ndimage.gaussian_filter``;
warp within 5× of the memory-copy bound.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from scipy import ndimage, signal

from ._common import markdown_table, page_head, peak_rss_mb, timeit, write_outputs


def _numba_copy():
    import numba

    @numba.njit(parallel=True, cache=True)
    def copy(src, dst):
        s = src.ravel()
        d = dst.ravel()
        for i in numba.prange(s.size):
            d[i] = s[i]

    return copy


def bench_size(n: int, repeat: int, threads: int, rng) -> list[dict]:
    import SimpleITK as sitk

    from classreg.kernels.diff import jacobian_determinant
    from classreg.kernels.fft import cross_correlate
    from classreg.kernels.fields import compose, expmap
    from classreg.kernels.smooth import gaussian
    from classreg.kernels.warp import warp

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    shape = (n, n, n)
    nvox = n ** 3
    img = ndimage.gaussian_filter(rng.random(shape, dtype=np.float32), 2.0)
    disp = (rng.random((*shape, 3), dtype=np.float32) - 0.5) * 6.0  # up to ±3 voxels
    disp = ndimage.gaussian_filter(disp, (3, 3, 3, 0))
    rows = []

    # ---- memory-copy bound: copy a buffer the size of the displacement field (12 B/voxel, larger than the caches)
    dst = np.empty_like(disp)
    t_np = timeit(lambda: np.copyto(dst, disp), repeat=repeat)["median_s"]
    ncopy = _numba_copy()
    t_nb = timeit(lambda: ncopy(disp, dst), repeat=repeat)["median_s"]
    copy_bw = 2 * disp.nbytes / min(t_np, t_nb)  # bytes/s, read + write
    rows.append(dict(kernel="memory copy (bound)", size=n, ours_s=min(t_np, t_nb), peer="numpy.copyto",
                     peer_s=t_np, bytes=2 * disp.nbytes))
    del dst

    def add(kernel, fn, nbytes, peer=None, peer_fn=None):
        ours = timeit(fn, repeat=repeat)["median_s"]
        row = dict(kernel=kernel, size=n, ours_s=ours, bytes=nbytes)
        if peer_fn is not None:
            row["peer"] = peer
            row["peer_s"] = timeit(peer_fn, repeat=max(2, repeat // 2))["median_s"]
        print(f"  {kernel}: {ours:.4f} s" + (f", {peer} {row['peer_s']:.4f} s" if peer_fn else ""), file=sys.stderr)
        rows.append(row)
        return row

    # ---- linear warp with a displacement field (voxel units)
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing="ij")) + np.moveaxis(disp, -1, 0)
    add("warp linear 3-D (disp)", lambda: warp(img, disp, order=1, mode="border"), nvox * (4 + 12 + 4),
        "scipy map_coordinates(order=1)", lambda: ndimage.map_coordinates(img, coords, order=1, mode="nearest"))
    s_img = sitk.GetImageFromArray(img)
    s_field = sitk.GetImageFromArray(disp[..., ::-1].astype(np.float64), isVector=True)  # (x, y, z) components
    s_tx = sitk.DisplacementFieldTransform(s_field)
    add("warp linear 3-D (disp) vs SimpleITK", lambda: warp(img, disp, order=1, mode="itk"), nvox * (4 + 12 + 4),
        f"SimpleITK Resample, {threads} threads",
        lambda: sitk.Resample(s_img, s_img, s_tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    add("warp cubic B-spline 3-D", lambda: warp(img, disp, order=3, mode="border"), nvox * (4 + 12 + 4),
        "scipy map_coordinates(order=3)", lambda: ndimage.map_coordinates(img, coords, order=3, mode="nearest"))
    del coords

    # ---- smoothing
    add("gaussian σ=2 vox", lambda: gaussian(img, 2.0), nvox * 8,
        "scipy gaussian_filter", lambda: ndimage.gaussian_filter(img, 2.0, mode="nearest"))

    # ---- field algebra and derivatives
    v = disp * 0.3
    add("compose u∘v", lambda: compose(v, v), nvox * 36)
    add("expmap (scaling & squaring)", lambda: expmap(v), nvox * 24)
    add("jacobian determinant", lambda: jacobian_determinant(v), nvox * 16,
        "numpy gradient + det", lambda: _numpy_jacdet(v))

    # ---- FFT cross-correlation, 2 channel pairs, "valid" shifts of a half-size b inside a
    b = [img[: n // 2, : n // 2, : n // 2].copy(), (img[: n // 2, : n // 2, : n // 2] ** 2)]
    a = [img, img ** 2]
    add("FFT cross-correlation (2 pairs, valid)", lambda: cross_correlate(a, b, mode="valid"), nvox * 8,
        "scipy.signal.correlate(fft) summed",
        lambda: sum(signal.correlate(ak, bk, mode="valid", method="fft") for ak, bk in zip(a, b)))

    for r in rows:
        r["mvox_per_s"] = nvox / r["ours_s"] / 1e6
        r["gb_per_s"] = r["bytes"] / r["ours_s"] / 1e9
        r["x_copy_bound"] = r["ours_s"] / (r["bytes"] / copy_bw)
        if r.get("peer_s"):
            r["speedup"] = r["peer_s"] / r["ours_s"]
    return rows


def _numpy_jacdet(u):
    g = [np.gradient(u[..., i]) for i in range(3)]
    j = np.stack([np.stack(gi, axis=-1) for gi in g], axis=-2) + np.eye(3, dtype=u.dtype)
    return np.linalg.det(j)


#: (kernel row, check, limit, statement): the targets of the issue "Foundation II", checked per size.
TARGETS = (
    ("warp linear 3-D (disp)", "speedup", 5.0, "linear 3-D warp ≥ 5× scipy.ndimage.map_coordinates(order=1)"),
    ("warp linear 3-D (disp) vs SimpleITK", "speedup", 1.0, "linear 3-D warp ≥ SimpleITK Resample (same threads)"),
    ("gaussian σ=2 vox", "speedup", 2.0, "Gaussian smoothing ≥ 2× scipy.ndimage.gaussian_filter"),
    ("warp linear 3-D (disp)", "x_copy_bound", 5.0, "linear 3-D warp within 5× of the memory-copy bound"),
)

COLUMNS = [("kernel", "kernel"), ("size", "n³"), ("ours_s", "classreg s"), ("mvox_per_s", "Mvox/s"),
           ("gb_per_s", "GB/s"), ("x_copy_bound", "× copy bound"), ("peer", "peer"), ("peer_s", "peer s"),
           ("speedup", "speed-up")]


def target_lines(rows: list[dict]) -> list[str]:
    """One line per target and size: the measured value and whether it meets the target."""
    out = []
    for kernel, key, limit, text in TARGETS:
        for r in rows:
            if r["kernel"] != kernel or key not in r:
                continue
            v = r[key]
            met = v >= limit if key == "speedup" else v <= limit
            out.append(f"* {text}, {r['size']}³: {v:.3g}× — {'met' if met else '**not met**'}")
    return out


def render_docs(payload: dict, table: str, command: str) -> str:
    generated, machine_line = page_head(command, payload["date"], payload["machine"])
    return "\n".join([
        "# Kernel benchmark",
        "",
        generated,
        "",
        f"{machine_line}; {payload['threads']} "
        "threads for numba and SimpleITK. float32 cubes; each time is the median of the repeats, peers timed in the "
        "same process right after classreg. GB/s counts the bytes a kernel must at least read and write; "
        "\"× copy bound\" is the time over the time a plain memory copy (the faster of numpy.copyto and a "
        "numba-parallel copy, measured in the same run on a buffer the size of the displacement field) needs to "
        "move those bytes. How each row is computed: benchmarks/kernels.py.",
        "",
        "## Targets",
        "",
        *target_lines(payload["rows"]),
        "",
        "## Table",
        "",
        table,
        "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 192])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for numba and SimpleITK (default: all)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    p.add_argument("--docs", default=None, metavar="PATH",
                   help="also write the markdown page there (docs/benchmarks-kernels.md for the published one)")
    args = p.parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        rows += bench_size(n, args.repeat, threads, rng)
        print(f"size {n}: done", file=sys.stderr)
    table = markdown_table(rows, COLUMNS)
    payload = {"threads": threads, "rows": rows, "peak_rss_mb": peak_rss_mb()}
    jpath, mpath = write_outputs("kernels", payload, table, args.out)
    print(table)
    print("\n".join(target_lines(rows)))
    print(f"\nwrote {jpath} and {mpath}")
    if args.docs:
        import json

        from pathlib import Path

        from classreg.io import atomic_output

        payload = json.loads(jpath.read_text())  # with the date and machine that write_outputs added
        command = "python -m benchmarks.kernels " + " ".join(argv if argv is not None else sys.argv[1:])
        with atomic_output(args.docs) as tmp:
            Path(tmp).write_text(render_docs(payload, table, command.strip()))
        print(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
