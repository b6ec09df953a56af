#!/usr/bin/python3
"""The issue-4 figures of every committed docs/PERFORMANCE.md, newest first, as one Markdown table.

    scripts/perf_history [--out FILE] [--path docs/PERFORMANCE.md] [--files F ...]

Each version of the report (`git log --follow` of --path, or the --files given, in that order;
a version whose figures equal the next newer one's is the same run, shown once) is read for its header (date, the commit the report measured, rounds, quick mode, the random-load
latency of an 8 MB working set before the benchmarks) and its targets table: the PreAct-ResNet-20
FQT step against PyTorch's fp32 step (median of per-round ratios) and against fqt's fp32 step,
the quantizer shares, and int8 / fp32 GEMM at 1024^3. A figure a version did not report is "—".
The steps' code changes from row to row (the "code" column); two rows of the same code show the
machine's own spread.
"""
import argparse
import re
import subprocess
import sys

# (column, regex on a targets-table row; group 1 = the measured figure)
SPEEDUPS = [(q, rf"^\| FQT-int8 \({re.escape(q)}\) step of PreAct-ResNet-20 >= 2x faster than PyTorch fp32[^|]*\| ([0-9.]+)x")
            for q in ("ptq", "psq", "psq/s", "bhq/s", "bhq")]
VS_FP32 = [(q, rf"^\| FQT-int8 \({re.escape(q)}\) step of PreAct-ResNet-20 >= 1\.5x faster than fqt fp32[^|]*\| ([0-9.]+)x")
           for q in ("psq",)]
SHARES = [(name, rf"^\| quantizer time \({re.escape(label)}\) <= 15%[^|]*\| ([0-9.]+)%")
          for name, label in (("psq", "PSQ"), ("psq/s", "PSQ, rows per sample"), ("bhq/s", "BHQ, rows per sample"),
                              ("bhq", "BHQ"))]


def first(pattern, text, flags=re.M):
    m = re.search(pattern, text, flags)
    return m.group(1) if m else None


def parse(text):
    """The figures of one report (a dict; absent figures are None)."""
    if not text.startswith("# Performance"):
        raise ValueError("not a performance report (no '# Performance' heading)")
    r = {}
    r["date"] = first(r"^- Date: (\d{4}-\d\d-\d\d)", text)
    r["code"] = first(r"^- Date: [^;]*; git ([0-9a-f]+)", text)
    r["rounds"] = first(r"\(rounds: [0-9.]+-[0-9.]+, n=(\d+)\)", text)
    r["quick"] = "QUICK MODE" in text
    r["mem8"] = first(r"before / after the benchmarks: [^/]*?8 MB (\d+) ns", text)
    r["torch_ms"] = None
    cols = None
    for line in text.splitlines():  # the training-step table's "median ms" column, by its header
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["model", "framework"] and "median ms" in cells:
            cols = cells
        elif cols and cells[:3] == ["preact_resnet20", "pytorch", "fp32"] and len(cells) == len(cols):
            r["torch_ms"] = cells[cols.index("median ms")]
            break
    r["gemm"] = first(r"^\| int8 GEMM >= 3x fp32 GEMM at 1024\^3 \| ([0-9.]+)x", text)
    for name, pat in SPEEDUPS:
        r["x_torch_" + name] = first(pat, text)
    for name, pat in VS_FP32:
        r["x_fp32_" + name] = first(pat, text)
    for name, pat in SHARES:
        r["share_" + name] = first(pat, text)
    return r


def git(*args):
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def versions(path):
    """(label, text) of each committed version of path, newest first."""
    out = []
    for line in git("log", "--follow", "--format=%h", "--", path).split():
        try:
            out.append((line, git("show", f"{line}:{path}")))
        except subprocess.CalledProcessError:  # (a commit that deleted or renamed it)
            continue
    return out


def table(rows):
    na = "—"
    head = ("| report commit | date | code | rounds | 8 MB ns | PyTorch ms | PSQ vs fqt fp32 | "
            "x PyTorch: PTQ | PSQ | psq/s | bhq/s | BHQ | quantizers: PSQ | psq/s | bhq/s | BHQ | int8/fp32 1024^3 |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        def f(key, suffix=""):
            return f"{r[key]}{suffix}" if r.get(key) else na
        rounds = "quick" if r["quick"] else f("rounds")
        lines.append("| " + " | ".join([
            label, f("date"), f("code"), rounds, f("mem8"), f("torch_ms"), f("x_fp32_psq", "x"),
            f("x_torch_ptq", "x"), f("x_torch_psq", "x"), f("x_torch_psq/s", "x"), f("x_torch_bhq/s", "x"),
            f("x_torch_bhq", "x"), f("share_psq", "%"), f("share_psq/s", "%"), f("share_bhq/s", "%"),
            f("share_bhq", "%"), f("gemm", "x")]) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default="docs/PERFORMANCE.md", help="the report's path in git (default %(default)s)")
    ap.add_argument("--files", nargs="+", metavar="F", help="read these files instead of git's versions (in order)")
    ap.add_argument("--out", help="write a Markdown document here instead of the table to stdout")
    a = ap.parse_args()
    if a.files:
        src = []
        for p in a.files:
            try:
                src.append((p, open(p, encoding="utf-8").read()))
            except OSError as e:
                sys.exit(f"perf_history: cannot read {p}: {e.strerror}")
    else:
        try:
            src = versions(a.path)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            sys.exit(f"perf_history: git log of {a.path} failed ({e}); run it inside the repository or give --files")
        if not src:
            sys.exit(f"perf_history: {a.path} has no committed version")
    rows = []
    for label, text in src:
        try:
            r = parse(text)
        except ValueError as e:
            sys.exit(f"perf_history: {label}: {e}")
        if rows and rows[-1][1] == r:  # the same run: label it with the older commit, which wrote it
            rows[-1] = (label, r)
            continue
        rows.append((label, r))
    t = table(rows)
    if not a.out:
        sys.stdout.write(t)
        return
    src_desc = (("the files " + ", ".join(f"`{p}`" for p in a.files) + ", in that order") if a.files
                else f"every committed version of `{a.path}`, newest first")
    cmd = "scripts/perf_history --out " + a.out + ("" if a.path == "docs/PERFORMANCE.md" else f" --path {a.path}")
    if a.files:
        cmd += " --files " + " ".join(a.files)
    doc = (f"# Performance reports over time\n\n<!-- Generated by scripts/perf_history; do not edit by hand. -->\n\n"
           f"- Command: `{cmd}`\n"
           f"- Source: {src_desc}: {len(src)} versions, {len(rows)} runs of `scripts/perf_report` "
           f"(each report's header names the machine, its CPU flags and load).\n"
           f"- `report commit`: the oldest commit holding that report (later edits of the same run are one row); "
           f"`code`: the commit whose binaries the report measured; `rounds`: fqt and PyTorch alternated that many "
           f"times (speedups are medians of per-round ratios); `8 MB ns`: random-load latency of an 8 MB working "
           f"set before the benchmarks (about 20 ns when the VM's share of the last-level cache holds it, ~100 ns "
           f"or more when not). Rows of the same code differ by the machine alone.\n"
           f"- Issue-4 targets: >= 2x PyTorch's fp32 step, >= 1.5x fqt's fp32 step, quantizers <= 15% of the step, "
           f"int8 >= 3x fp32 at 1024^3. psq/s, bhq/s: rows per sample (`--dgrad-rows sample`); PSQ, BHQ: pixel "
           f"rows (the default).\n\n" + t)
    with open(a.out, "w", encoding="utf-8") as fh:
        fh.write(doc)
    print(f"wrote {a.out} ({len(rows)} reports)")


if __name__ == "__main__":
    main()
