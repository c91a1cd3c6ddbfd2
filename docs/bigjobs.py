import json, sys, time, random, string, urllib.request
addr = sys.argv[1]; n = int(sys.argv[2])
rnd = random.Random(7)
payload = 0
ids = []
for i in range(n):
    cmd = "true #" + "".join(rnd.choice(string.ascii_letters) for _ in range(256*1024 - 200))
    env = {f"V{k}": "".join(rnd.choice(string.ascii_letters) for _ in range(15*1024)) for k in range(4)}
    body = json.dumps({"command": ["sh", "-c", cmd], "env": env, "resources": {"cpu_millis": 100, "memory_mb": 16}}).encode()
    payload += len(cmd) + sum(len(v) for v in env.values())
    req = urllib.request.Request(f"http://{addr}/v1/jobs", data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        ids.append(json.load(r)["id"])
deadline = time.time() + 600
while time.time() < deadline:
    with urllib.request.urlopen(f"http://{addr}/v1/cluster") as r:
        c = json.load(r)
    done = sum(c["jobs"].get(s, 0) for s in ("succeeded", "failed", "cancelled"))
    if done >= n: break
    time.sleep(1)
print(json.dumps({"jobs": n, "payload_bytes": payload, "cluster_jobs": c["jobs"]}))
