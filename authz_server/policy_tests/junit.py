"""JUnit XML for CI systems: one testsuite per test file, one testcase per test."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from authz_server.policy_tests.outcome import Outcome


def write_junit(outcomes: Sequence[Outcome], path: Path) -> None:
    by_file: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        by_file[outcome.file].append(outcome)
    root = ET.Element("testsuites", name="authz-server test", tests=str(len(outcomes)),
                      failures=str(sum(o.status == "fail" for o in outcomes)),
                      errors=str(sum(o.status == "error" for o in outcomes)))
    for file, group in by_file.items():
        suite = ET.SubElement(root, "testsuite", name=file, tests=str(len(group)),
                              failures=str(sum(o.status == "fail" for o in group)),
                              errors=str(sum(o.status == "error" for o in group)))
        for outcome in group:
            case = ET.SubElement(suite, "testcase", classname=file, name=outcome.name)
            if outcome.status != "pass":
                tag = "failure" if outcome.status == "fail" else "error"
                detail = ET.SubElement(case, tag, message=outcome.problems[0] if outcome.problems else outcome.status)
                detail.text = "\n".join([*outcome.problems, "", outcome.explanation]).strip()
    tree = ET.ElementTree(root)
    ET.indent(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=True)
