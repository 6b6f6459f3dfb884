#!/usr/bin/env bash
# NVIDIA's perf_analyzer (the `perf-analyzer` wheel) for `benchmarks.perf_analyzer_compare`, installed
# as $VENV/opt/perf_analyzer with a wrapper at $VENV/bin/perf_analyzer.
#
# The wheel's binary is built for glibc >= 2.38 (manylinux_2_38). On an older glibc (Debian 12 has
# 2.36) the wrapper runs it under Debian 13's glibc, libstdc++ and libgcc, unpacked beside it and
# loaded by their own dynamic loader for this binary alone; the system's libraries stay as they are.
set -euo pipefail
VENV=${VENV:-.venv}
VERSION=${PERF_ANALYZER_VERSION:-2.60.0}
DEBIAN=${PERF_ANALYZER_DEBIAN:-https://deb.debian.org/debian}
ARCH=$(uname -m)
DEST=$VENV/opt/perf_analyzer
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "[perf_analyzer] perf-analyzer==$VERSION for $ARCH"
"$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: \
    --platform "manylinux_2_38_$ARCH" -d "$WORK" "perf-analyzer==$VERSION"
"$VENV/bin/python" -m zipfile -e "$WORK"/perf_analyzer-*.whl "$WORK/wheel"
rm -rf "$DEST.new" && mkdir -p "$DEST.new"
install -m 755 "$WORK/wheel/perf_analyzer/bin/perf_analyzer" "$DEST.new/perf_analyzer"

glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
if [ "$(printf '%s\n2.38\n' "$glibc" | sort -V | head -1)" != "2.38" ]; then
    echo "[perf_analyzer] glibc $glibc < 2.38: fetching Debian 13's runtime for it"
    deb_arch=$([ "$ARCH" = x86_64 ] && echo amd64 || echo arm64)
    curl -fsSL "$DEBIAN/dists/trixie/main/binary-$deb_arch/Packages.xz" | xz -dc > "$WORK/Packages"
    for pkg in libc6 'libstdc++6' libgcc-s1; do
        file=$(awk -v p="$pkg" '$1 == "Package:" {hit = ($2 == p)} hit && $1 == "Filename:" {print $2; exit}' "$WORK/Packages")
        [ -n "$file" ] || { echo "[perf_analyzer] $pkg is not in Debian 13's index" >&2; exit 1; }
        curl -fsSL -o "$WORK/pkg.deb" "$DEBIAN/$file"
        dpkg-deb -x "$WORK/pkg.deb" "$WORK/root"
    done
    lib=$(dirname "$(find "$WORK/root" -name 'ld-linux*.so.*' | head -1)")
    mkdir -p "$DEST.new/runtime" && cp -a "$lib"/. "$DEST.new/runtime/"
    loader=$(basename "$(ls "$DEST.new"/runtime/ld-linux*.so.*)")
    system_libs=/lib/$ARCH-linux-gnu:/usr/lib/$ARCH-linux-gnu
    run="exec \"\$here/runtime/$loader\" --library-path \"\$here/runtime:$system_libs\" \"\$here/perf_analyzer\" \"\$@\""
else
    run='exec "$here/perf_analyzer" "$@"'
fi
rm -rf "$DEST" && mv "$DEST.new" "$DEST"
here=$(cd "$DEST" && pwd)
cat > "$VENV/bin/perf_analyzer" <<WRAPPER
#!/usr/bin/env bash
here="$here"
$run
WRAPPER
chmod +x "$VENV/bin/perf_analyzer"
"$VENV/bin/perf_analyzer" --version
