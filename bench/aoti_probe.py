"""Which AOTInductor package settings load in a fresh process on this GPU (diagnostic).

source .whl/activate.sh && python bench/aoti_probe.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch

LOAD = """
import sys, torch
p, mode = sys.argv[1], sys.argv[2]
r = torch._inductor.aoti_load_package(p)
print("loaded", r.get_constant_fqns(), flush=True)
if mode == "user":
    w = torch.load(p + ".w.pt").cuda()
    r.load_constants({n: w for n in r.get_constant_fqns()}, check_full_update=True, user_managed=True)
x = torch.randn(2, 8, 16, 16, device="cuda").half()
print("ran", r(x)[0].shape if isinstance(r(x), (list, tuple)) else r(x).shape, flush=True)
"""


class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(8, 8, 3, 3, device="cuda").half())

    def forward(self, x):
        return (torch.conv2d(x, self.w, padding=1).relu(),)


def main() -> None:
    m = M()
    x = torch.randn(2, 8, 16, 16, device="cuda").half()
    ep = torch.export.export(m, (x,))
    with tempfile.TemporaryDirectory() as tmp:
        for in_so in (True, False):
            path = os.path.join(tmp, f"m{in_so}.pt2")
            torch._inductor.aoti_compile_and_package(
                ep, package_path=path, inductor_configs={"aot_inductor.package_constants_in_so": in_so}
            )
            torch.save(m.w.cpu(), path + ".w.pt")
            for mode in ("as-is", "user"):
                proc = subprocess.run(
                    [sys.executable, "-X", "faulthandler", "-c", LOAD, path, mode],
                    capture_output=True,
                    text=True,
                )
                print(
                    f"constants_in_so={in_so} load={mode}: exit {proc.returncode}",
                    proc.stdout.strip(),
                    proc.stderr.strip()[-600:] if proc.returncode else "",
                    flush=True,
                )


if __name__ == "__main__":
    main()
