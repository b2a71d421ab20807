"""Plain-text tables of ``ptmpi bench`` results (printed by rank 0)."""

from __future__ import annotations

from ptmpi.bench.stages import STAGES
from ptmpi.memory import format_bytes


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def format_result(result: dict) -> str:
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores; {m['ranks']} rank(s), "
             f"{m['fft_threads_per_rank']} FFT thread(s) per rank; numpy {m['numpy']}, "
             f"scipy {m['scipy']}; {result['dtype']}; medians of {result['repeat']} runs"]
    for row in result["cases"]:
        lines.append("")
        lines.append(f"== {row['n']}^3, {row['angles']} angles, step {row['step']}, "
                     f"{row['algorithm'].upper()}: {row['angles_local']} angles and "
                     f"{row['frames_local']} frames on rank 0 ==")
        lines.append(f"floors: memory bandwidth {row['bandwidth_gb_s']:.1f} GB/s (copy), "
                     f"FFT fwd+inv of ({row['frames_local']}, {row['n'] // 2}, "
                     f"{row['n'] // 2}) {_ms(row['fft_floor_s'])} ms, "
                     f"{row['gfma_per_s']:.1f} GFMA/s (in-cache sgemm)")
        if "projector_fwd_s" in row:
            lines.append(f"projector fwd {_ms(row['projector_fwd_s'])} ms, adj "
                         f"{_ms(row['projector_adj_s'])} ms "
                         f"({row['projector_fwd_us_per_slice_angle']:.2f} us per real slice "
                         f"and angle); far-field batch fwd+adj {_ms(row['fft_batch_s'])} ms; "
                         f"windowing fwd+adj {_ms(row['windowing_s'])} ms")
        if "zstep_s" in row:
            lines.append(f"z-step {_ms(row['zstep_s'])} ms (closed form, noise-free data), "
                         f"{_ms(row['zstep_counts_s'])} ms (photon counts: smoothed "
                         "likelihood, a Newton root per pixel)")
        astra = row.get("astra_s_per_slice_angle")
        if astra and "projector_fwd_s" in row:
            ours = row["projector_fwd_us_per_slice_angle"] * 1e-6
            lines.append("ASTRA CPU fwd per slice and angle: " + ", ".join(
                f"{kind} {t * 1e6:.1f} us (ours {t / ours:.1f}x faster)"
                for kind, t in astra.items()))
        floors = row["floors_s"]
        stages = row["stages_s"]
        lines.append(f"APT iteration: {_ms(row['iteration_s'])} ms median (slowest rank "
                     f"{_ms(row['iteration_s_max_rank'])} ms), floor "
                     f"{_ms(floors['iteration'])} ms, ratio "
                     f"{row['iteration_s'] / floors['iteration']:.1f}x (memory and FFT floors "
                     f"only: {_ms(floors['iteration_bandwidth'])} ms, "
                     f"{row['iteration_s'] / floors['iteration_bandwidth']:.1f}x)")
        lines.append(f"  {'stage':<10} {'ms':>8} {'share':>6} {'floor ms':>9} {'ratio':>6}")
        for stage in STAGES:
            t, f = stages[stage], floors[stage]
            ratio = f"{t / f:.1f}x" if f > 0 else "-"
            lines.append(f"  {stage:<10} {_ms(t):>8} {t / row['iteration_mean_s']:>6.0%} "
                         f"{_ms(f):>9} {ratio:>6}")
        if "memory_note" in row:
            lines.append(f"memory per rank: {row['memory_note']}")
        if "memory_predicted_bytes" in row:
            pred, meas = row["memory_predicted_bytes"], row["memory_measured_bytes"]
            lines.append(f"memory per rank (solver arrays): predicted {format_bytes(pred)}, "
                         f"measured peak {format_bytes(meas)} ({pred / meas - 1:+.0%}); "
                         f"process peak RSS {format_bytes(row['peak_rss_bytes'])}")
    return "\n".join(lines)


def format_scaling(result: dict) -> str:
    lines = []
    for kind in ("strong", "strong_slabs", "weak", "weak_slabs"):
        rows = result.get(kind, [])
        if not rows:
            continue
        name = kind.replace("_slabs", "")
        lines.append(f"{name} scaling ({result['description'][kind]}):")
        lines.append(f"  {'ranks':>5} {'angles':>6} {'iteration ms':>13} {'efficiency':>10}")
        for r in rows:
            lines.append(f"  {r['ranks']:>5} {r['angles']:>6} {_ms(r['iteration_s']):>13} "
                         f"{r['efficiency']:>10.0%}")
    return "\n".join(lines)
