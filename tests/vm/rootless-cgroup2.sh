#!/bin/sh
# Runs in the cgroup-v2-only VM (../shared/vm-cgroup2/run target/debug/berth THIS
# examples/base/make-rootfs): issue 21's rootless mode with a delegated cgroup v2
# subtree, laid out as systemd's user manager delegates one (user@UID.service, owned by
# the user, controllers enabled above it), and without one.
set -u
fail=0
grep -q cgroup2 /proc/mounts && ! grep -q " cgroup " /proc/mounts && echo "cgroup: v2 only"
useradd -M -s /bin/sh rluser || exit 1
uid=$(id -u rluser)
command -v newuidmap >/dev/null || echo "note: no newuidmap here: berth maps one id"
./make-rootfs /tmp/rootfs >/dev/null || exit 1
tar --numeric-owner -C /tmp/rootfs -cf /tmp/base.tar . && chmod 644 /tmp/base.tar
mkdir -p /home/rl && chown rluser /home/rl
C=/sys/fs/cgroup
D=$C/user.slice/user-$uid.slice/user@$uid.service
mkdir -p "$D/shell"
for p in $C $C/user.slice $C/user.slice/user-$uid.slice; do
  echo "+memory +pids +cpu" > "$p/cgroup.subtree_control" || echo "cannot enable controllers in $p"
done
for f in "$D" "$D/cgroup.procs" "$D/cgroup.subtree_control" "$D/cgroup.threads" \
         "$D/shell" "$D/shell/cgroup.procs" "$D/shell/cgroup.threads" "$D/shell/cgroup.subtree_control"; do
  chown rluser "$f"
done
# As the user, inside the delegated subtree (as `systemd-run --user --scope` puts it).
inside() { sh -c 'echo $$ > "$0/shell/cgroup.procs" && exec runuser -u rluser -- env HOME=/home/rl berth "$@"' "$D" "$@"; }
# As the user, in a cgroup it may not write (a login session's scope).
outside() { runuser -u rluser -- env HOME=/home/rl berth "$@"; }
inside import -t base:1 /tmp/base.tar >/dev/null 2>/tmp/import.err || { echo "import: FAIL"; cat /tmp/import.err; exit 1; }
out=$(inside run --rm --memory 64m --cpus 0.5 --pids-limit 50 base:1 sh -c 'cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/pids.max' 2>&1)
if [ "$out" = "$(printf '67108864\n50000 100000\n50')" ]; then echo "delegated limits: PASS"; else echo "delegated limits: FAIL"; echo "$out"; fail=1; fi
inside run -d --name held --memory 32m base:1 sleep 60 >/dev/null 2>&1
n=$(ls -d "$D"/berth/*/ 2>/dev/null | wc -l)
if [ "$n" -ge 1 ] && grep -q 33554432 "$D"/berth/*/memory.max; then echo "container cgroup in the delegated subtree: PASS"; else echo "container cgroup in the delegated subtree: FAIL"; ls -R "$D" | head -20; fail=1; fi
out=$(inside run --rm --memory 16m base:1 sh -c 'head -c 100000000 /dev/zero | tail > /dev/null' 2>&1); code=$?
if [ "$code" = 137 ]; then echo "delegated OOM kill: PASS"; else echo "delegated OOM kill: FAIL ($code)"; echo "$out"; fail=1; fi
inside rm -f held >/dev/null 2>&1
out=$(outside run --rm --memory 64m base:1 cat /proc/self/cgroup 2>&1); code=$?
case "$out" in
  *"are not applied"*"systemd-run --user --scope"*) [ $code = 0 ] && echo "undelegated warning: PASS" || { echo "undelegated warning: FAIL ($code)"; echo "$out"; fail=1; } ;;
  *) echo "undelegated warning: FAIL"; echo "$out"; fail=1 ;;
esac
pkill -KILL -u rluser
exit $fail
