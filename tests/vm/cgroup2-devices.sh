#!/bin/sh
# Runs in the cgroup-v2-only VM (../shared/vm-cgroup2/run target/debug/berth THIS
# examples/base/make-rootfs): the device policy of issue 15 on v2, where it is a
# BPF_PROG_TYPE_CGROUP_DEVICE program. For each of /dev/kmsg (c 1:11), loop0 (b 7:0) and
# loop-control (c 10:237): mknod, then open for writing and reading, in `run`, `exec`
# and a build's RUN step; /dev/null, zero, urandom and pts must keep working. Then issue
# 18 on v2: a container whose supervisor was killed is adopted (same process, its cgroup
# kept) and its memory limit still holds. And issue 21's cgroupfs inside the container.
set -u
export BERTH_STORE=/var/tmp/store
grep -q cgroup2 /proc/mounts && ! grep -q " cgroup " /proc/mounts && echo "cgroup: v2 only"
./make-rootfs /tmp/rootfs >/dev/null && berth import /tmp/rootfs --tag base:1 >/dev/null || exit 1
probe='for d in "c 1 11 kmsg" "b 7 0 loop0" "c 10 237 loopctl" "c 5 1 console"; do set -- $d;
  mknod /dev/probe-$4 $1 $2 $3 2>/dev/null;
  if out=$( (echo x > /dev/probe-$4) 2>&1 ); then echo "$4 OPEN"; else case "$out" in *"not permitted"*) echo "$4 blocked";; *) echo "$4 other: $out";; esac; fi;
  if out=$( (head -c 1 /dev/probe-$4 >/dev/null) 2>&1 ); then echo "$4 READ"; else case "$out" in *"not permitted"*) echo "$4 noread";; *) echo "$4 other: $out";; esac; fi;
done;
head -c 4 /dev/zero >/dev/null && head -c 4 /dev/urandom >/dev/null && echo x > /dev/null && test -c /dev/pts/ptmx && echo harmless-ok'
check() { # $1: what, $2: output
  n=$(printf '%s\n' "$2" | grep -c -e ' blocked$' -e ' noread$')
  if [ "$n" = 8 ] && printf '%s\n' "$2" | grep -q harmless-ok; then echo "$1: PASS"; else echo "$1: FAIL"; printf '%s\n' "$2"; fail=1; fi
}
fail=0
check run "$(berth run --rm base:1 sh -c "$probe" 2>&1)"
berth run -d --name probe base:1 sleep 120 >/dev/null
check exec "$(berth exec probe sh -c "$probe" 2>&1)"
berth rm -f probe >/dev/null
mkdir -p /tmp/proj && cd /tmp/proj
printf '%s\n' "$probe" > probe.sh
cat > berth.toml <<'TOML'
[app]
name = "probe"
[image]
from = "base:1"
[[image.steps]]
copy = ["probe.sh", "/probe.sh"]
[[image.steps]]
run = "sh /probe.sh > /dev/shm/out; cat /dev/shm/out; test $(grep -c -e ' blocked$' -e ' noread$' /dev/shm/out) = 8 && grep -q harmless-ok /dev/shm/out"
TOML
if berth build >/tmp/build.log 2>&1; then echo "build RUN: PASS"; else echo "build RUN: FAIL"; cat /tmp/build.log; fail=1; fi
field() { berth --json inspect adopt | sed -n "s/.*\"$1\": \([0-9]*\).*/\1/p" | head -n 1; }
berth run -d --name adopt --memory 32M --restart on-failure base:1 sh -c 'trap "exit 7" TERM; while true; do sleep 0.1; done' >/dev/null
pid=$(field pid)
kill -9 "$(berth --json ps | tr -d ' \n' | sed -n 's/.*"supervisor":{"pid":\([0-9]*\).*/\1/p')"
sleep 0.5
out=$(berth ps)
id=$(berth --json ps | tr -d ' \n' | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
out="$out $(cat /sys/fs/cgroup/berth/$id/memory.max)"
same=$(field pid)
berth stop adopt >/dev/null
code=$(berth --json ps -a | tr -d ' \n' | sed -n 's/.*"exit_code":\([0-9]*\).*/\1/p')
if [ "$same" = "$pid" ] && printf '%s' "$out" | grep -q 33554432 && ! printf '%s' "$out" | grep -q "supervisor lost" && [ "$code" = 7 ]; then
  echo "adopt: PASS"
else
  echo "adopt: FAIL (pid $pid, exit $code)"; printf '%s\n' "$out"; fail=1
fi
berth rm -f adopt >/dev/null
# Issue 21: the container's own cgroup at /sys/fs/cgroup (cgroup2 through its namespace),
# read-only, with the limits it was given; the host's cgroups out of sight.
out=$(berth run --rm --memory 64M --cpus 0.5 base:1 sh -c 'cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max; mkdir /sys/fs/cgroup/x 2>/dev/null || echo read-only; ls /sys/fs/cgroup | grep -c "^berth$"' 2>&1)
if [ "$out" = "$(printf '67108864\n50000 100000\nread-only\n0')" ]; then echo "cgroupfs: PASS"; else echo "cgroupfs: FAIL"; printf '%s\n' "$out"; fail=1; fi
exit $fail
