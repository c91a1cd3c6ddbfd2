#!/usr/bin/env bash
# Cut the leader of a 3-replica `rustci server` cluster off the network (a
# real partition: network namespaces on a bridge, the leader's veth taken
# down) while clients keep submitting jobs, then heal it and check the
# cluster.
#
#   sudo scripts/netns-partition.sh BINARY [RUNS]      (root; iproute2, python3)
#
# Each run starts a fresh cluster: replica N listens on 10.77.0.N:7878 in
# network namespace rciN, whose veth (root side rcivN) is a port of the
# bridge rcibr0 (10.77.0.254/24, so clients in the root namespace reach all
# three). Once a leader is agreed on, three client threads submit `true` jobs
# with unique idempotency keys to all three replicas (a key goes to the next
# replica, 0.3 s timeout, until one answers 201). A probe inside the
# leader's namespace watches its /v1/cluster and submits to it directly.
# Then `ip link set rcivL down` (the cut), ~5 s of submissions, `ip link set
# rcivL up` (the heal), 2 s more, stop, and checks.
#
# One JSON line per run on stdout:
#   resumed_ms      cut -> first 201 for a request sent after the cut
#                   (from a majority replica; null if none)
#   elected_ms      cut -> a majority replica reports itself leader of a
#                   newer term (polled every 20 ms)
#   not_leader_ms   cut -> the isolated old leader stops saying `leader`
#                   (it says `degraded` first)
#   stepped_down_ms cut -> it says neither `leader` nor `degraded`
#   old_leader_acked_after_cut  201s the old leader gave for requests sent
#                   after the cut (to the root-namespace clients or the probe)
#   lost            acknowledged keys missing (or bound to another job id)
#   duplicated      keys or job ids present more than once
#   agreed          all three replicas: same commit_index, applied_index,
#                   state_digest, term and leader once writes stopped
#   patient_at_cut  per follower, the answers (status@ms after the cut) a
#                   client with a 40 s timeout got for the write in flight at
#                   the cut and the next ones, up to the first 201
#   error_but_committed  keys answered with an error status (503...) whose
#                   job exists all the same (informational)
# Exit status 0 when every run held all of these, 1 otherwise. Logs and
# client records stay in $RCI_WORKDIR (default: a mktemp dir, removed on
# success unless KEEP=1). Namespaces, bridge and processes are removed on
# exit, whatever happens.
set -euo pipefail

usage() { echo "usage: $0 BINARY [RUNS] (as root)" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
BIN=$(readlink -f -- "$1")
RUNS=${2:-5}
[[ -x $BIN ]] || { echo "$0: $1 is not an executable" >&2; exit 2; }
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || usage
[[ $(id -u) -eq 0 ]] || { echo "$0: needs root (network namespaces)" >&2; exit 2; }
for tool in ip python3; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install iproute2 python3)" >&2; exit 2; }
done

BR=rcibr0
NS=(rci1 rci2 rci3)
TOKEN=netns-partition-api
JOIN=netns-partition-join
CUT_SECS=${CUT_SECS:-5}
WORK=${RCI_WORKDIR:-$(mktemp -d /tmp/rci-netns.XXXXXX)}
mkdir -p "$WORK"
SERVER_PIDS=()
ORCH_PID=
FAILED=0

stop_servers() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${SERVER_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  SERVER_PIDS=()
}

teardown_net() {
  local ns pid
  for ns in "${NS[@]}"; do
    if ip netns list | grep -qw "^$ns"; then
      # Whatever still runs in there is ours (this script's replicas or probe).
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  ip link del "$BR" 2>/dev/null || true
  # A veth disappears with its namespace; remove stray root ends anyway.
  for i in 1 2 3; do ip link del "rciv$i" 2>/dev/null || true; done
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $ORCH_PID ]]; then
    kill -TERM "$ORCH_PID" 2>/dev/null || true
    wait "$ORCH_PID" 2>/dev/null || true
  fi
  # The link may be down mid-run; the servers stop faster with it up.
  for i in 1 2 3; do ip link set "rciv$i" up 2>/dev/null || true; done
  stop_servers
  teardown_net
  if [[ $rc -eq 0 && $FAILED -eq 0 && -z ${KEEP:-} && -z ${RCI_WORKDIR:-} ]]; then
    rm -rf -- "$WORK"
  else
    echo "$0: logs kept in $WORK" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

setup_net() {
  local i
  ip link add "$BR" type bridge
  ip addr add 10.77.0.254/24 dev "$BR"
  ip link set "$BR" up
  for i in 1 2 3; do
    ip netns add "rci$i"
    ip link add "rciv$i" type veth peer name eth0 netns "rci$i"
    ip link set "rciv$i" master "$BR"
    ip link set "rciv$i" up
    ip -n "rci$i" addr add "10.77.0.$i/24" dev eth0
    ip -n "rci$i" link set eth0 up
    ip -n "rci$i" link set lo up
  done
}

start_servers() {
  local dir=$1 i j peers
  for i in 1 2 3; do
    peers=()
    for j in 1 2 3; do [[ $j == "$i" ]] || peers+=(--peer "$j=10.77.0.$j:7878"); done
    ip netns exec "rci$i" "$BIN" server --id "$i" --listen "10.77.0.$i:7878" \
      --data-dir "$dir/data$i" "${peers[@]}" --api-token "$TOKEN" --join-token "$JOIN" \
      >"$dir/replica$i.log" 2>&1 &
    SERVER_PIDS+=($!)
  done
}

# The probe runs inside the old leader's namespace: it records the replica's
# own view of its state (every change) and submits to it directly, with a
# long timeout so that a late 201 is seen. Ends when its stdin closes.
PROBE=$(cat <<'EOF'
import http.client, json, sys, threading, time
addr, token, prefix = sys.argv[1], sys.argv[2], sys.argv[3]
H = {"Authorization": "Bearer " + token}
out_lock = threading.Lock()
stop = threading.Event()
def emit(rec):
    with out_lock:
        print(json.dumps(rec), flush=True)
def call(method, path, body=None, headers=None, timeout=0.5):
    c = http.client.HTTPConnection(addr, 7878, timeout=timeout)
    try:
        h = dict(H); h.update(headers or {})
        if body is not None: h["Content-Type"] = "application/json"
        c.request(method, path, body=body, headers=h)
        r = c.getresponse(); data = r.read()
        return r.status, data
    finally:
        c.close()
def watch():
    last = None
    while not stop.is_set():
        t = time.time()
        try:
            st, data = call("GET", "/v1/cluster")
            j = json.loads(data)
            cur = (j.get("state"), j.get("leader"), j.get("term"))
        except Exception as e:
            cur = ("error:" + type(e).__name__, None, None)
        if cur != last:
            emit({"kind": "state", "t": t, "state": cur[0], "leader": cur[1], "term": cur[2]})
            last = cur
        time.sleep(0.02)
def submit():
    n = 0
    while not stop.is_set():
        key = "%s-%d" % (prefix, n); n += 1
        t0 = time.time()
        try:
            st, data = call("POST", "/v1/jobs", b'{"command":["true"]}', {"Idempotency-Key": key}, timeout=10)
            jid = json.loads(data).get("id") if st == 201 else None
            err = None
        except Exception as e:
            st, jid, err = None, None, type(e).__name__
        emit({"kind": "post", "sent": t0, "done": time.time(), "key": key, "status": st, "id": jid, "err": err})
        if st != 201: time.sleep(0.05)
threads = [threading.Thread(target=f, daemon=True) for f in (watch, submit)]
for th in threads: th.start()
sys.stdin.read()
stop.set()
for th in threads: th.join(timeout=11)
EOF
)

# One run, from a leader being agreed on to the checks; prints the JSON line.
ORCH=$(cat <<'EOF'
import http.client, json, os, re, subprocess, sys, threading, time, urllib.parse
run, workdir, token, cut_secs, probe_src = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
ADDR = {1: "10.77.0.1", 2: "10.77.0.2", 3: "10.77.0.3"}
H = {"Authorization": "Bearer " + token}
def note(msg):
    print("run %d: %s" % (run, msg), file=sys.stderr, flush=True)
def call(i, method, path, body=None, headers=None, timeout=0.3):
    c = http.client.HTTPConnection(ADDR[i], 7878, timeout=timeout)
    try:
        h = dict(H); h.update(headers or {})
        if body is not None: h["Content-Type"] = "application/json"
        c.request(method, path, body=body, headers=h)
        r = c.getresponse(); data = r.read()
        return r.status, data
    finally:
        c.close()
def cluster(i, timeout=1.0):
    try:
        st, data = call(i, "GET", "/v1/cluster", timeout=timeout)
        return json.loads(data) if st == 200 else None
    except Exception:
        return None

# 1. A leader every replica agrees on.
deadline = time.time() + 30
leader = None
while time.time() < deadline:
    views = [cluster(i) for i in (1, 2, 3)]
    if all(views):
        ls = {v["leader"] for v in views}
        if len(ls) == 1 and None not in ls:
            l = ls.pop()
            if views[l - 1]["state"] == "leader":
                leader = l; break
    time.sleep(0.1)
if leader is None:
    print(json.dumps({"run": run, "error": "no leader agreed on within 30 s"})); sys.exit(1)

# 2. Clients: three threads, each starting its rotation at another replica.
acks, fails = [], {}
lock = threading.Lock()
stop = threading.Event()
def client(c):
    n = 0
    while not stop.is_set():
        key = "r%d-c%d-%d" % (run, c, n); n += 1
        r = c
        # A key is retried on the next replica until one answers 201, even
        # past `stop`, so that every key sent is either acknowledged or known
        # never to be (we give up only after 30 s of trying).
        give_up = None
        while True:
            i = r % 3 + 1; r += 1
            t0 = time.time()
            try:
                st, data = call(i, "POST", "/v1/jobs", b'{"command":["true"]}', {"Idempotency-Key": key})
                why = str(st)
            except Exception as e:
                st, data, why = None, None, type(e).__name__
            t1 = time.time()
            if st == 201:
                jid = json.loads(data)["id"]
                with lock: acks.append({"t": t1, "sent": t0, "key": key, "id": jid, "replica": i})
                break
            with lock: fails[(i, why)] = fails.get((i, why), 0) + 1
            if stop.is_set():
                give_up = give_up or time.time() + 30
                if time.time() > give_up: break
            if st is not None: time.sleep(0.005)
threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(3)]
for th in threads: th.start()
time.sleep(1.0)

old = leader
probe = subprocess.Popen(["ip", "netns", "exec", "rci%d" % old, "python3", "-c", probe_src,
                          ADDR[old], token, "iso-r%d" % run],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
probe_lines = []
def read_probe():
    for line in probe.stdout: probe_lines.append(json.loads(line))
pr = threading.Thread(target=read_probe, daemon=True); pr.start()
time.sleep(0.5)

# The majority's view, every 20 ms: when does one of them lead?
majority = [i for i in (1, 2, 3) if i != old]
watch = []
def watcher(i):
    last = None
    while not stop.is_set():
        t = time.time(); v = cluster(i, timeout=0.2)
        cur = (v["state"], v["leader"], v["term"]) if v else ("unreachable", None, None)
        if cur != last:
            with lock: watch.append({"t": t, "replica": i, "state": cur[0], "leader": cur[1], "term": cur[2]})
            last = cur
        time.sleep(0.02)
watchers = [threading.Thread(target=watcher, args=(i,), daemon=True) for i in majority]
for th in watchers: th.start()
old_term = cluster(old)["term"]
# A patient client per follower (40 s timeout, one write after another, from
# before the cut to the end): how long a write relayed to a leader that
# vanishes is held, and what it is answered.
patient = {i: [] for i in majority}
def patient_client(i):
    n = 0
    while not stop.is_set():
        key = "patient-r%d-%d-%d" % (run, i, n); n += 1
        t0 = time.time()
        try:
            st, data = call(i, "POST", "/v1/jobs", b'{"command":["true"]}', {"Idempotency-Key": key}, timeout=40)
            rec = {"key": key, "sent": t0, "done": time.time(), "status": st,
                   "id": json.loads(data)["id"] if st == 201 else None,
                   "body": data[:200].decode(errors="replace") if st != 201 else None}
        except Exception as e:
            rec = {"key": key, "sent": t0, "done": time.time(), "status": None, "err": type(e).__name__}
        patient[i].append(rec)
        if rec["status"] != 201: time.sleep(0.02)
patients = [threading.Thread(target=patient_client, args=(i,), daemon=True) for i in majority]
for th in patients: th.start()
time.sleep(0.2)

# 3. The cut.
t_cut0 = time.time()
subprocess.run(["ip", "link", "set", "rciv%d" % old, "down"], check=True)
t_cut = time.time()
note("leader %d cut off at %.3f (ip link took %.1f ms)" % (old, t_cut, (t_cut - t_cut0) * 1000))
time.sleep(cut_secs)
t_heal = time.time()
subprocess.run(["ip", "link", "set", "rciv%d" % old, "up"], check=True)
note("healed at %.3f" % t_heal)
time.sleep(2.0)
stop.set()
for th in threads + watchers + patients: th.join(timeout=45)
time.sleep(0.5)
probe.stdin.close(); probe.wait(timeout=20); pr.join(timeout=5)

# 4. Numbers.
post_cut = sorted((a for a in acks if a["sent"] >= t_cut), key=lambda a: a["t"])
first = post_cut[0] if post_cut else None
resumed_ms = round((first["t"] - t_cut) * 1000, 1) if first else None
# The root-namespace clients cannot reach the old leader during the cut (so
# this is 0 unless the cut leaks); the probe inside its namespace can: a 201
# it gets while the old leader is isolated is a write acknowledged without a
# majority.
old_acked = sum(1 for a in acks if a["replica"] == old and t_cut <= a["sent"] < t_heal)
iso_posts = [p for p in probe_lines if p["kind"] == "post" and t_cut <= p["sent"] < t_heal]
old_acked += sum(1 for p in iso_posts if p["status"] == 201 and p["done"] < t_heal)
iso_late = [p for p in iso_posts if p["done"] >= t_heal]
states = [p for p in probe_lines if p["kind"] == "state"]
degraded = next((p for p in states if p["t"] >= t_cut and p["state"] != "leader"), None)
degraded_ms = round((degraded["t"] - t_cut) * 1000, 1) if degraded else None
elected = next((w for w in sorted(watch, key=lambda w: w["t"]) if w["t"] >= t_cut and w["state"] == "leader"
                and (w["term"] or 0) > old_term), None)
elected_ms = round((elected["t"] - t_cut) * 1000, 1) if elected else None
gone = next((p for p in states if p["t"] >= t_cut and p["state"] not in ("leader", "degraded")), None)
gone_ms = round((gone["t"] - t_cut) * 1000, 1) if gone else None
# Per follower: the writes in flight at the cut or sent after it, up to the
# first 201: "status@answered_ms_after_cut" each.
patient_summary = {}
for i, rs in patient.items():
    seen = []
    for r in rs:
        if r["done"] < t_cut: continue
        seen.append("%s@%d" % (r["status"] or r.get("err"), round((r["done"] - t_cut) * 1000)))
        if r["status"] == 201: break
    patient_summary[str(i)] = seen[:6] + (["..."] if len(seen) > 6 else [])
leader_during_cut = [p for p in states if t_cut + 1.0 <= p["t"] < t_heal and p["state"] in ("leader", "degraded")]

# 5. Agreement once writes stopped: every replica the same, twice in a row.
agreed, views, prev = False, None, None
deadline = time.time() + 30
while time.time() < deadline:
    views = [cluster(i) for i in (1, 2, 3)]
    if all(views):
        sig = {(v["commit_index"], v["applied_index"], v["state_digest"], v["term"], v["leader"]) for v in views}
        if len(sig) == 1 and views[0]["commit_index"] == views[0]["applied_index"]:
            if prev == sig: agreed = True; break
            prev = sig
        else:
            prev = None
    time.sleep(0.2)

# 6. Every acknowledged job exactly once, on every replica.
acked = {a["key"]: a["id"] for a in acks}
acked.update({p["key"]: p["id"] for p in probe_lines if p["kind"] == "post" and p["status"] == 201})
acked.update({r["key"]: r["id"] for rs in patient.values() for r in rs if r["status"] == 201})
def jobs_of(i):
    out, cursor = [], None
    while True:
        q = "/v1/jobs?limit=1000" + ("&cursor=" + urllib.parse.quote(cursor, safe="") if cursor else "")
        st, data = call(i, "GET", q, timeout=10)
        if st != 200: raise RuntimeError("replica %d: GET %s: %s %s" % (i, q, st, data[:200]))
        page = json.loads(data)
        out += page["jobs"]; cursor = page.get("next_cursor")
        if not cursor: return out
lost = duplicated = 0
per_replica, final_keys = {}, {}
for i in (1, 2, 3):
    try:
        jobs = jobs_of(i)
    except Exception as e:
        note("listing jobs on replica %d failed: %s" % (i, e)); lost = max(lost, len(acked)); continue
    by_key, by_id = {}, {}
    for j in jobs:
        by_key.setdefault(j.get("idempotency_key"), []).append(j["id"])
        by_id[j["id"]] = by_id.get(j["id"], 0) + 1
    l = sum(1 for k, jid in acked.items() if by_key.get(k) != [jid])
    d = sum(1 for k, ids in by_key.items() if k is not None and len(ids) > 1) + sum(1 for n in by_id.values() if n > 1)
    per_replica[i] = {"jobs": len(jobs), "lost": l, "duplicated": d}
    final_keys = by_key
    lost, duplicated = max(lost, l), max(duplicated, d)

# Writes answered with an error (not a timeout) that were committed all the
# same: a client that does not retry under the same key is misled.
answered = [r for rs in patient.values() for r in rs] + [p for p in probe_lines if p["kind"] == "post"]
error_but_committed = sorted(r["key"] for r in answered if r["status"] not in (None, 201) and r["key"] in final_keys)
new_leader = views[0]["leader"] if views and views[0] else None
rec = {"run": run, "old_leader": old, "new_leader": new_leader,
       "resumed_ms": resumed_ms, "resumed_via": first["replica"] if first else None,
       "elected_ms": elected_ms, "not_leader_ms": degraded_ms, "stepped_down_ms": gone_ms, "old_leader_acked_after_cut": old_acked,
       "lost": lost, "duplicated": duplicated, "agreed": agreed,
       "acked": len(acked), "probe_answers_during_cut": sorted({str(p["status"] or p["err"]) for p in iso_posts if p["done"] < t_heal}),
       "probe_answered_after_heal": ["%s:%s" % (p["status"] or p["err"], p["key"]) for p in iso_late], "acked_during_cut": sum(1 for a in acks if t_cut <= a["t"] < t_heal),
       "patient_at_cut": patient_summary, "error_but_committed": error_but_committed,
       "commit_index": views[0]["commit_index"] if agreed else None,
       "state_digest": views[0]["state_digest"] if agreed else None}
with open(os.path.join(workdir, "client.json"), "w") as f:
    json.dump({"t_cut": t_cut, "t_heal": t_heal, "old": old, "acks": acks, "probe": probe_lines,
               "watch": watch, "patient": patient,
               "fails": {"%d:%s" % k: v for k, v in fails.items()}, "views": views,
               "per_replica": per_replica, "result": rec}, f)
note("failures by replica:reason %s" % json.dumps({"%d:%s" % k: v for k, v in sorted(fails.items())}))
if leader_during_cut:
    note("old leader still led more than 1 s into the cut: %s" % leader_during_cut[:3])
print(json.dumps(rec), flush=True)
ok = (resumed_ms is not None and first["replica"] != old and old_acked == 0 and lost == 0
      and duplicated == 0 and agreed and gone_ms is not None and gone_ms < 1000 and not leader_during_cut)
sys.exit(0 if ok else 1)
EOF
)

# Stale state of an interrupted earlier run: refuse if it still runs anything.
for ns in "${NS[@]}"; do
  if ip netns list | grep -qw "^$ns" && [[ -n $(ip netns pids "$ns" 2>/dev/null) ]]; then
    echo "$0: namespace $ns exists and runs processes: another run in progress?" >&2
    exit 2
  fi
done
teardown_net

for run in $(seq "$RUNS"); do
  dir="$WORK/run$run"
  mkdir -p "$dir"
  setup_net
  start_servers "$dir"
  rc=0
  # In the background, so that a signal to this script is handled at once.
  python3 -c "$ORCH" "$run" "$dir" "$TOKEN" "$CUT_SECS" "$PROBE" &
  ORCH_PID=$!
  wait "$ORCH_PID" || rc=$?
  ORCH_PID=
  [[ $rc -eq 0 ]] || FAILED=1
  stop_servers
  teardown_net
  for i in 1 2 3; do
    n=$(grep -cE ' (WARN|ERROR) ' "$dir/replica$i.log" || true)
    [[ $n -eq 0 ]] || echo "run $run: replica $i logged $n WARN/ERROR lines ($dir/replica$i.log)" >&2
  done
done
exit "$FAILED"
