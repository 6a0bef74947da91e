#!/usr/bin/env bash
# Proves that scripts/install-deps.sh names every Debian package a build used, whatever happens to be
# installed on this machine. It collects each file under /usr that the build read (the CMake package
# configs and modules CMake loaded, the libraries it links, every header the compilers included),
# finds the package that owns it, and fails unless that package is in install-deps' list, reachable
# from it through Depends / Pre-Depends (Recommends are not installed: --no-install-recommends), or
# Essential. The CUDA toolkit (/usr/local/cuda) is a prerequisite, not a Debian package.
#   scripts/check-deps.sh [BUILD_DIR]     (default: build; run after the build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
if [[ ! -f $build/build.ninja ]]; then
  echo "check-deps: $build/build.ninja not found (build with -G Ninja first)" >&2
  exit 1
fi
mapfile -t listed < <(sed -n '/^pkgs=(/,/)/p' scripts/install-deps.sh | tr -d '()' | sed 's/^pkgs=//' | tr ' ' '\n' | grep -v '^$')
if ((${#listed[@]} == 0)); then
  echo "check-deps: no pkgs=( ... ) list in scripts/install-deps.sh" >&2
  exit 1
fi

# Files the build read: paths named in build.ninja (CMake's inputs, link libraries) and the headers
# ninja recorded for every object.
files=$( { grep -o '/usr/[^ |:$"]*' "$build/build.ninja"; ninja -C "$build" -t deps | sed -n 's/^ *\(\/usr\/[^ ]*\)$/\1/p'; } |
         grep -v '^/usr/local/' | sort -u)
nfiles=$(wc -l <<<"$files")

# Owning packages. Debian's merged /usr: dpkg may list a file under /lib rather than /usr/lib, or
# only under its resolved path.
declare -A owner_of=()
while IFS= read -r line; do
  pkg=${line%%: *}; path=${line#*: }
  for p in ${pkg//,/ }; do owner_of[$path]+="${p%%:*} "; done
done < <(dpkg -S $files 2>/dev/null || true)
needed=()
unowned=()
for f in $files; do
  o=${owner_of[$f]:-}
  if [[ -z $o ]]; then
    for alt in "${f#/usr}" "$(readlink -f "$f")"; do
      o=$(dpkg -S "$alt" 2>/dev/null | head -1 | cut -d: -f1 || true)
      [[ -n $o ]] && break
    done
  fi
  if [[ -z $o ]]; then unowned+=("$f"); else needed+=($o); fi
done
mapfile -t needed < <(printf '%s\n' "${needed[@]}" | sort -u)

# What installing the list brings: the Depends / Pre-Depends closure, plus Essential packages.
declare -A provided=()
while IFS= read -r p; do provided[${p%%:*}]=1; done < <(
  apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
    --no-enhances "${listed[@]}" 2>/dev/null | grep -v '^ ' | tr -d '<>'
  dpkg-query -W -f='${Package} ${Essential}\n' | awk '$2 == "yes" {print $1}')

missing=()
for p in "${needed[@]}"; do [[ -n ${provided[$p]:-} ]] || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "check-deps: the build used packages that scripts/install-deps.sh does not install:" >&2
  for p in "${missing[@]}"; do
    echo "  $p (for example $(for f in $files; do [[ " ${owner_of[$f]:-} " == *" $p "* ]] && { echo "$f"; break; }; done))" >&2
  done
  exit 1
fi
echo "check-deps: $nfiles files under /usr from ${#needed[@]} packages, all installed by install-deps' ${#listed[@]} (${#unowned[@]} files owned by no package)"
