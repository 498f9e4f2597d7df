"""The suite's Markdown: a header, one table per section (its columns, its rows' notes and errors),
then the goals of the project's issue against the figures."""

from __future__ import annotations

from typing import Any, Optional


def verdict(passed: Optional[bool]) -> str:
    return "pass" if passed else ("FAIL" if passed is False else "n/a")


def cell(value: Any, fmt: Optional[str]) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, str) and fmt not in (None, "text"):
        return value
    try:
        if fmt == "ms":
            return f"{value:.3f}"
        if fmt == "x":
            return f"{value:.2f}x"
        if fmt == "pct":
            return f"{value:.1%}"
        if fmt == "e":
            return f"{value:.1e}"
        if fmt == "f1":
            return f"{value:.1f}"
        if fmt == "f2":
            return f"{value:.2f}"
        if fmt == "f3":
            return f"{value:.3f}"
        if fmt == "int":
            return f"{value:,.0f}"
        if fmt == "bool":
            return "pass" if value else "FAIL"
    except (TypeError, ValueError):
        pass
    return str(value).replace("|", "/").replace("\n", " ")


def markdown(data: dict) -> str:
    lines = [f"## accelerator suite, {data['date']}, {data['device_kind']} x {data['device_count']}, "
             f"jax {data['jax_version']}", ""]
    lines.append(f"Backend {data['backend']} ({data.get('platform_version') or 'unknown platform version'}), jaxlib "
                 f"{data.get('jaxlib_version')}, Python {data['python']}; budget {data['budget_s']} s, elapsed "
                 f"{data['elapsed_s']} s{' (finished)' if data.get('finished') else ''}"
                 f"{'; SMOKE RUN (toy shapes, timings meaningless)' if data.get('smoke') else ''}"
                 f"{'; stopped at the hard time limit' if data.get('stopped') else ''}.")
    for record in data["sections"].values():
        lines += ["", f"### {record['number']}. {record['title']}", ""]
        seconds = f", {record['seconds']} s" if record.get("seconds") is not None else ""
        lines.append(f"Status: {record['status']}{seconds}.")
        if record.get("error"):
            lines.append(f"Error: `{' '.join(record['error'][:600].split()).replace(chr(96), chr(39))}`")
        columns = list(record["columns"])
        rows = record["rows"]
        if any(r.get("note") or r.get("error") for r in rows):
            columns.append(["note", "note", "text"])
        lines += ["", "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
        for r in rows:
            cells = []
            for key, _, fmt in columns:
                if key == "note":
                    text = "; ".join(x for x in (f"error: {r['error']}" if r.get("error") else "", r.get("note") or "") if x)
                    cells.append(cell(text[:500], "text"))
                else:
                    cells.append(cell(r.get(key), fmt))
            lines.append("| " + " | ".join(cells) + " |")
        for note in record.get("notes", []):
            lines.append(f"\n{note}")
    if data.get("goals"):
        lines += ["", "### Goals (the project's issue)", "", "| section | goal | measured | result |", "|---|---|---|---|"]
        for g in data["goals"]:
            result = verdict(g["pass"])
            lines.append(f"| {g['section']} | {g['goal']} | {g['measured']} | {result} |")
    return "\n".join(lines) + "\n"
