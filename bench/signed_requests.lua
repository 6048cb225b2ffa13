-- wrk script: POSTs the same 1 KB body with pre-signed svix headers, one line of the requests file each
-- (id, timestamp, signature). Each wrk thread takes its own slice of the lines, so that no two requests
-- share an id (a repeated id would only measure a gateway's dedupe path). Every request also carries one
-- constant extra header (the body's HMAC for adnanh/webhook), so every server gets exactly the same load.
--
-- wrk runs each thread's init after the threads before it have started their load, and counts their
-- requests meanwhile but not the time: init only reads the file whole, and each request splits off its
-- own line. Splitting every line in init took about 0.7 s per thread, a head start of the first thread
-- that made req/s some 7% too high over 10 s, and CPU that counted as the load generator's.
--
-- args: requests file, body file, number of wrk threads, extra header name, extra header value
local threads = {}
local LINE = "^([^\t]+)\t([^\t]+)\t([^\n]+)\n"

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path, body_path = args[1], args[2]
  nthreads = tonumber(args[3])
  extra_name, extra_value = args[4], args[5]
  local f = io.open(body_path, "rb")
  body = f:read("*a")
  f:close()
  f = io.open(path, "rb")
  lines = f:read("*a")
  f:close()
  rewind()
end

-- Back to this thread's first line (line id, counting from 0): after the last, its ids come round again.
function rewind()
  pos = 1
  for _ = 1, id do
    pos = lines:find("\n", pos, true) + 1
  end
end

function request()
  local _, last, msg_id, stamp, signature = lines:find(LINE, pos)
  if last == nil then
    rewind()
    _, last, msg_id, stamp, signature = lines:find(LINE, pos)
  end
  pos = last + 1
  -- Past the other threads' lines: this thread's next is nthreads lines on.
  for _ = 2, nthreads do
    local newline = lines:find("\n", pos, true)
    if newline == nil then
      break
    end
    pos = newline + 1
  end
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["svix-id"] = msg_id, ["svix-timestamp"] = stamp, ["svix-signature"] = signature,
    [extra_name] = extra_value,
  }, body)
end
