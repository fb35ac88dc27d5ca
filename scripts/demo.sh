#!/usr/bin/env bash
# discrep demo: set the machine up, then replicate a sample tree through the real
# FUSE export, change it, replicate again, and show what each cycle cost.
#   ./scripts/demo.sh            (run as root on Debian; installs what is missing)
#   DEMO_DIR=/some/dir ./scripts/demo.sh   to keep the trees somewhere else
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh"
D="$REPO/.venv/bin/discrep"

WORK="${DEMO_DIR:-$(mktemp -d /tmp/discrep-demo-XXXXXX)}"
SRC="$WORK/source" DST="$WORK/replica"
mkdir -p "$SRC"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building a sample tree in $SRC"
mkdir -p "$SRC/docs/notes" "$SRC/data" "$SRC/empty"
for i in $(seq 1 200); do printf 'note %d\n%s\n' "$i" "$(head -c 600 /dev/urandom | base64 -w0)" > "$SRC/docs/notes/n$i.txt"; done
head -c $((32 << 20)) /dev/urandom > "$SRC/data/disk.img"          # 32 MiB "VM image"
truncate -s 256M "$SRC/data/sparse.img"; printf 'tail' | dd of="$SRC/data/sparse.img" bs=1 seek=$((200 << 20)) conv=notrunc status=none
ln -s notes/n1.txt "$SRC/docs/latest"; ln "$SRC/docs/notes/n2.txt" "$SRC/docs/hardlink.txt"
touch "$SRC/$(printf 'caf\xe9-latin1-name')"
setfattr -n user.origin -v demo "$SRC/docs/notes/n3.txt" 2>/dev/null || true
du -sh --apparent-size "$SRC" | sed 's/^/  /'

step "cycle 1: the initial full copy (scan, snapshot, FUSE export, sync, ack)"
"$D" replicate "$SRC" "$DST"

step "changing the source: in-place writes, an append, a rename of a directory, a delete, chmod"
printf 'PATCHED' | dd of="$SRC/data/disk.img" bs=1 seek=$((10 << 20)) conv=notrunc status=none
printf 'PATCHED' | dd of="$SRC/data/disk.img" bs=1 seek=$((30 << 20)) conv=notrunc status=none
echo "appended line" >> "$SRC/docs/notes/n7.txt"
mv "$SRC/docs/notes" "$SRC/docs/archive"
rm "$SRC/docs/archive/n9.txt"
chmod 600 "$SRC/docs/archive/n10.txt"

step "cycle 2: only changed blocks cross the export (the renamed directory costs nothing)"
"$D" replicate --json "$SRC" "$DST" | tail -n1 | python3 -m json.tool

step "independent check: rsync -aHAXnci --delete (prints nothing when identical) and discrep verify"
rsync -aHAXnci --delete --exclude=/.discrep/ "$SRC/" "$DST/"
"$D" verify "$SRC" "$DST"

step "recovery points on the replica"
"$D" history "$DST"

echo
echo "trees kept in $WORK (remove with: rm -rf $WORK)"
