# Sourced on the GPU machine (cwd: the checkout) by the scripts that run the request path
# against the checkout: `sglang_spectrum.kernels` maps to the top-level kernels/ only when
# installed, so a shim package in /tmp/shim links it; PYTHONPATH puts the shim before the
# parcels' /tmp/site (scripts/gpu_setup.sh); PYTHONSAFEPATH: never import the repo's own
# sglang_spectrum/ from the cwd. SHIM_SRC: a folder holding another sglang_spectrum/ and
# kernels/ to run instead (an older commit's, for a comparison in turns).
SHIM_SRC=$(cd "${SHIM_SRC:-.}" && pwd)
rm -rf /tmp/shim && mkdir -p /tmp/shim && cp -r "$SHIM_SRC/sglang_spectrum" /tmp/shim/ \
  && ln -s "$SHIM_SRC/kernels" /tmp/shim/sglang_spectrum/kernels
export PYTHONPATH=/tmp/shim:/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
