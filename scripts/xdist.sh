# Shared by the GPU scripts that run the gpu tests (source it after PYTHONPATH is set): the device machine has no
# registry, so pytest-xdist comes from wheels carried in .carry/wheels; `xdist` is then (-n 2), else empty.
if ls .carry/wheels/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/lmdp_wheels .carry/wheels/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/lmdp_wheels
fi
xdist=()
python3 -c 'import xdist' 2> /dev/null && xdist=(-n 2)
