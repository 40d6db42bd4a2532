#!/usr/bin/env python3
"""Writes the ONNX backend node tests of the installed `onnx` package to a folder.

Since onnx 1.23 the wheels no longer ship `onnx/backend/test/data/node`; the test cases are
generated from `onnx/backend/test/case/node` (the same `expect(...)` calls that made the shipped
data). This runs those generators and writes each test as the shipped layout had it:
`<out>/node/<test>/model.onnx` and `test_data_set_0/{input,output}_N.pb`.

    PYTHONPATH=<pydeps-onnx> python3 tests/assets/gen_node_tests.py OUT
"""
import sys

import onnx.backend.test.case.node as node_cases
import onnx.backend.test.cmd_tools as cmd_tools


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    cases = node_cases.collect_testcases(None)

    class Args:
        output = sys.argv[1]

    # cmd_tools.generate_data writes whatever model_test.collect_testcases returns, in the
    # shipped layout; give it the node cases.
    cmd_tools.model_test.collect_testcases = lambda: cases
    cmd_tools.generate_data(Args)
    print(f"[node-tests] onnx {__import__('onnx').__version__}: {len(cases)} node tests", file=sys.stderr)


if __name__ == "__main__":
    main()
