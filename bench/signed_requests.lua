-- Cycles through pre-signed requests (one per line: id, timestamp, signature), each wrk thread taking
-- its own slice so that no two requests share an id (a repeated id would only measure the dedupe path).
local threads = {}
local counter = 1

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path, body_path = args[1], args[2]
  local nthreads = tonumber(args[3])
  local f = io.open(body_path, "rb")
  body = f:read("*a")
  f:close()
  requests = {}
  local index = 0
  for line in io.lines(path) do
    if index % nthreads == id then
      local msg_id, ts, sig = line:match("([^\t]+)\t([^\t]+)\t([^\t]+)")
      table.insert(requests, wrk.format("POST", nil, {
        ["Content-Type"] = "application/json",
        ["svix-id"] = msg_id, ["svix-timestamp"] = ts, ["svix-signature"] = sig,
      }, body))
    end
    index = index + 1
  end
end

function request()
  local r = requests[counter]
  counter = counter + 1
  if counter > #requests then counter = 1 end
  return r
end
