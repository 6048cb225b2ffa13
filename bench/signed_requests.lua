-- wrk script: POSTs the same 1 KB body with pre-signed svix headers, one line of the requests file each
-- (id, timestamp, signature). Each wrk thread takes its own slice of the lines, so that no two requests
-- share an id (a repeated id would only measure a gateway's dedupe path). Every request also carries one
-- constant extra header (the body's HMAC for adnanh/webhook), so every server gets exactly the same load.
--
-- args: requests file, body file, number of wrk threads, extra header name, extra header value
local threads = {}
local counter = 1

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path, body_path = args[1], args[2]
  local nthreads = tonumber(args[3])
  extra_name, extra_value = args[4], args[5]
  local f = io.open(body_path, "rb")
  body = f:read("*a")
  f:close()
  ids, stamps, signatures = {}, {}, {}
  local index = 0
  for line in io.lines(path) do
    if index % nthreads == id then
      local msg_id, ts, sig = line:match("([^\t]+)\t([^\t]+)\t([^\t]+)")
      table.insert(ids, msg_id)
      table.insert(stamps, ts)
      table.insert(signatures, sig)
    end
    index = index + 1
  end
end

function request()
  local i = counter
  counter = counter + 1
  if counter > #ids then counter = 1 end
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["svix-id"] = ids[i], ["svix-timestamp"] = stamps[i], ["svix-signature"] = signatures[i],
    [extra_name] = extra_value,
  }, body)
end
