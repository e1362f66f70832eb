-- wrk script of `make bench-api`: one scenario per run, chosen by environment variables.
--
-- BENCH_MODE   get       GET a random line of BENCH_LINES ("<token>\t<path>", token may be "-")
--              get-bust  the same with a unique "?bust=" parameter: every request misses the cache
--              batch     POST /api/v1/vms/batch/ with BENCH_BATCH new VMs without NICs (token BENCH_TOKEN)
--              mixed     GETs as in "get" and BENCH_WRITE_PCT % (default 10) writes by the line's user: a
--                        create of one VM (on a list line, else at a coin flip: 60 % of the writes) or a
--                        rename of a VM of theirs (the line's detail path: 40 %)
-- BENCH_RUN    a run id that keeps VM names unique across runs
-- The summary is printed as one JSON line prefixed with "BENCH_RESULT ".

local mode = os.getenv("BENCH_MODE") or "get"
local run_id = os.getenv("BENCH_RUN") or tostring(os.time())
local batch_size = tonumber(os.getenv("BENCH_BATCH") or "10")
local batch_token = os.getenv("BENCH_TOKEN") or ""
local image = os.getenv("BENCH_IMAGE") or "bench-image"
local write_percent = tonumber(os.getenv("BENCH_WRITE_PCT") or "10")

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
  table.insert(threads, thread)
end

local lines = {}
local counter = 0

local function load_lines()
  local path = os.getenv("BENCH_LINES")
  if not path then return end
  for line in io.lines(path) do
    local token, target = line:match("^(%S+)\t(%S+)$")
    if token then table.insert(lines, {token, target}) end
  end
end

function init(args)
  math.randomseed(os.time() * 1000 + (thread_id or 0))
  load_lines()
end

local function headers(token)
  local h = {["Accept"] = "application/json"}
  if token ~= "-" then h["Authorization"] = "Token " .. token end
  return h
end

local function unique(prefix)
  counter = counter + 1
  return string.format("%s%s-%d-%d", prefix, run_id, thread_id or 0, counter)
end

-- extra: more JSON members of the item (a batch's VMs have no NIC: the batch writer's thousands of
-- VMs per run fit no network; a mixed create gets one on its tenant's default network).
local function vm_item(name, extra)
  return string.format(
    '{"name":"%s","image":"%s","vcpus":1,"memory_mb":64,"disk_gb":1%s}', name, image, extra or "")
end

local function get(bust)
  local line = lines[math.random(#lines)]
  local path = line[2]
  if bust then
    counter = counter + 1
    local sep = path:find("?", 1, true) and "&" or "?"
    path = string.format("%s%sbust=%s-%d-%d", path, sep, run_id, thread_id or 0, counter)
  end
  return wrk.format("GET", path, headers(line[1]))
end

local function write_json(method, path, token, body)
  local h = headers(token)
  h["Content-Type"] = "application/json"
  return wrk.format(method, path, h, body)
end

function request()
  if mode == "get" then return get(false) end
  if mode == "get-bust" then return get(true) end
  if mode == "batch" then
    local items = {}
    local prefix = unique("b")
    for i = 1, batch_size do items[i] = vm_item(prefix .. "-" .. i, ',"networks":[]') end
    return write_json("POST", "/api/v1/vms/batch/", batch_token, '{"vms":[' .. table.concat(items, ",") .. ']}')
  end
  -- mixed
  if math.random(100) > write_percent then return get(false) end
  local line = lines[math.random(#lines)]
  if math.random(2) == 1 or not line[2]:find("/vms/%x") then
    return write_json("POST", "/api/v1/vms/", line[1], vm_item(unique("m")))
  end
  return write_json("PATCH", line[2], line[1], string.format('{"name":"%s"}', unique("r")))
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f,"errors_connect":%d,"errors_read":%d,"errors_write":%d,' ..
    '"errors_status":%d,"errors_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max, latency.mean,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
