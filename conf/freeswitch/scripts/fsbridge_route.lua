--[[
fsbridge_route.lua: ring the caller's responsible manager (from retailCRM, through fsbridge), and fall
back to a ring group / queue / operator when there is none, when fsbridge is slow or down, or when the
manager does not answer. Install into FreeSWITCH's scripts directory; dialplan/fsbridge_inbound.xml runs it.

  GET <fsbridge_url>?phone=<caller id>[&domain=<${domain_name}>]  ->  200 "100" (an extension) or 200 ""
  (nobody). The domain tells a virtual PBX's fsbridge (tenants_dir) whose retailCRM to ask; fsbridge with
  one company ignores it.

The lookup blocks this channel's thread, so it has a connect timeout and a total timeout, and any answer
that is not 200 with 1-16 digits (an error page, a timeout, garbage) means the fallback. fsbridge answers
"" itself after its own routing.timeout (1 s by default): keep fsbridge_timeout above that.

Channel variables (set them before `lua fsbridge_route.lua`; all optional but the fallback):
  fsbridge_fallback         where to go without a manager: a `transfer` destination, "<extension>
                            [XML <context>]", e.g. "2000 XML default" (stock: the sales ring group).
                            A script argument overrides it: `lua fsbridge_route.lua 2000 XML default`
  fsbridge_url              http://127.0.0.1:8090/routing/manager  (fsbridge's http.internal_listen)
  fsbridge_connect_timeout  0.5   seconds to connect to fsbridge
  fsbridge_timeout          2     seconds for the whole lookup
  fsbridge_dial             user/{ext}   dial string of a manager; {ext} is the extension
  fsbridge_ring_timeout     25    seconds the manager's phone rings before the fallback
  fsbridge_transport        auto | socket | curl

Transport. FreeSWITCH's mod_lua embeds whatever Lua it was built with and ships no LuaSocket, so a stock
install has no HTTP client inside Lua. `auto` uses LuaSocket when `require "socket.http"` works (e.g.
Debian's lua-socket for the Lua version mod_lua links: nothing is forked, and a deadline is enforced across
connect, send and receive), and otherwise the curl binary, present on practically every server, through
io.popen with --connect-timeout and --max-time. The curl exit status is read from the shell's output, not
from pclose(), because FreeSWITCH may reap children itself and then pclose() reports nothing useful.

Outside FreeSWITCH (no `session` global) it is a command:
  lua fsbridge_route.lua <caller number> [fallback ...]   (FSBRIDGE_URL, FSBRIDGE_TRANSPORT from the env)
prints "bridge <dial string>" or "fallback <destination>" and does nothing else.
]]

local M = {}

M.DEFAULTS = {
  url = "http://127.0.0.1:8090/routing/manager", -- http.internal_listen: routing is not on the public port
  connect_timeout = 0.5,
  timeout = 2.0,
  dial = "user/{ext}",
  ring_timeout = 25,
  transport = "auto",
}

local MAX_ANSWER = 64 -- bytes; an extension is at most 16 digits, anything longer is not an answer

local function log(level, message)
  if freeswitch and freeswitch.consoleLog then
    freeswitch.consoleLog(level, "fsbridge_route: " .. message .. "\n")
  else
    io.stderr:write("fsbridge_route [" .. level .. "]: " .. message .. "\n")
  end
end

-- RFC 3986 unreserved characters pass, every other byte is %XX: '+' in particular, which a query
-- string would otherwise turn into a space.
function M.urlencode(text)
  return (string.gsub(text, "[^A-Za-z0-9%-%._~]", function(c)
    return string.format("%%%02X", string.byte(c))
  end))
end

function M.is_extension(text)
  return type(text) == "string" and #text >= 1 and #text <= 16 and string.match(text, "^%d+$") ~= nil
end

-- Seconds as "S.mmm" without string.format("%f"): that follows the C locale, and a process that set
-- LC_NUMERIC to a comma locale would hand curl "0,500".
local function seconds(value)
  local ms = math.floor(value * 1000 + 0.5)
  return string.format("%d.%03d", math.floor(ms / 1000), ms % 1000)
end

local function shell_quote(text)
  return "'" .. string.gsub(text, "'", "'\\''") .. "'"
end

-- LuaSocket ----------------------------------------------------------------------------------------

local function socket_available()
  local ok = pcall(require, "socket.http")
  return ok
end

-- socket.http applies its TIMEOUT to each socket call; a reply trickling in byte by byte would never hit
-- it. This socket recomputes what is left of one deadline before every call instead.
local function deadline_socket(socket, deadline, connect_timeout)
  local real, err = socket.tcp()
  if not real then return nil, err end
  return setmetatable({}, { __index = function(_, name)
    local method = real[name]
    if type(method) ~= "function" then return method end
    return function(_, ...)
      if name == "settimeout" then return 1 end -- socket.http's 60 s: ours rules
      local left = deadline - socket.gettime()
      if left <= 0 then return nil, "timeout" end
      if name == "connect" and left > connect_timeout then left = connect_timeout end
      real:settimeout(left, "t")
      return method(real, ...)
    end
  end })
end

local function fetch_socket(url, connect_timeout, timeout)
  local http = require("socket.http")
  local socket = require("socket")
  local deadline = socket.gettime() + timeout
  local chunks, size = {}, 0
  local ok, status = http.request({
    url = url,
    method = "GET",
    redirect = false,
    headers = { ["user-agent"] = "fsbridge_route.lua" },
    create = function() return deadline_socket(socket, deadline, connect_timeout) end,
    sink = function(chunk, err)
      if chunk then
        size = size + #chunk
        if size > MAX_ANSWER then return nil, "answer too long" end
        chunks[#chunks + 1] = chunk
      end
      return 1
    end,
  })
  if not ok then return nil, nil, tostring(status) end
  return tonumber(status), table.concat(chunks), nil
end

-- curl ------------------------------------------------------------------------------------------------

local function fetch_curl(url, connect_timeout, timeout)
  -- -q ignores ~/.curlrc, --noproxy '*' ignores http_proxy from FreeSWITCH's environment, -g stops curl
  -- from reading [] or {} in the URL as a glob.
  local command = "curl -q -s -g --noproxy '*' --connect-timeout " .. seconds(connect_timeout) ..
    " --max-time " .. seconds(timeout) .. " --max-filesize " .. MAX_ANSWER ..
    " -w '\\n%{http_code}' " .. shell_quote(url) .. " 2>/dev/null; echo \" $?\""
  local pipe, err = io.popen(command, "r")
  if not pipe then return nil, nil, "cannot run curl: " .. tostring(err) end
  local output = pipe:read("*a") or ""
  pipe:close()
  local body, code, exit = string.match(output, "^(.*)\n(%d%d%d) (%d+)%s*$")
  if not body then
    local exit_only = string.match(output, "(%d+)%s*$")
    if exit_only == "127" then return nil, nil, "curl is not installed" end
    return nil, nil, "curl gave no answer (exit " .. tostring(exit_only) .. ")"
  end
  if exit ~= "0" then
    local reasons = { ["6"] = "host not resolved", ["7"] = "connection refused", ["28"] = "timeout",
                      ["52"] = "empty reply", ["56"] = "connection reset", ["63"] = "answer too long" }
    return nil, nil, "curl exit " .. exit .. (reasons[exit] and (" (" .. reasons[exit] .. ")") or "")
  end
  return tonumber(code), body, nil
end

-- the decision ----------------------------------------------------------------------------------------

-- The extension fsbridge named, or nil and why not (a log line).
function M.lookup(phone, opts)
  if not phone or phone == "" then return nil, "no caller number" end
  local url = opts.url .. (string.find(opts.url, "?", 1, true) and "&" or "?") .. "phone=" .. M.urlencode(phone)
  if opts.domain then url = url .. "&domain=" .. M.urlencode(opts.domain) end
  local fetch
  if opts.transport == "socket" or (opts.transport ~= "curl" and socket_available()) then
    fetch = fetch_socket
  else
    fetch = fetch_curl
  end
  local ok, status, body, err = pcall(fetch, url, opts.connect_timeout, opts.timeout)
  if not ok then return nil, "lookup failed: " .. tostring(status) end
  if err then return nil, "lookup failed: " .. err end
  if status ~= 200 then return nil, "fsbridge answered HTTP " .. tostring(status) end
  local answer = string.match(body or "", "^%s*(.-)%s*$")
  if answer == "" then return nil, "no free responsible manager" end
  if not M.is_extension(answer) then return nil, "fsbridge's answer is not an extension, ignored" end
  return answer, nil
end

function M.dial_string(template, ext, ring_timeout)
  local dial = string.gsub(template, "{ext}", ext)
  local timeout_var = "leg_timeout=" .. tostring(math.floor(ring_timeout))
  -- {...} must open a dial string: merge into the admin's block rather than put a second one first.
  if string.sub(dial, 1, 1) == "{" then
    return "{" .. timeout_var .. "," .. string.sub(dial, 2)
  end
  return "{" .. timeout_var .. "}" .. dial
end

local function number(value, default)
  local n = tonumber(value)
  if n and n > 0 then return n end
  return default
end

local function options(get)
  local d = M.DEFAULTS
  return {
    url = get("fsbridge_url") or d.url,
    connect_timeout = number(get("fsbridge_connect_timeout"), d.connect_timeout),
    timeout = number(get("fsbridge_timeout"), d.timeout),
    dial = get("fsbridge_dial") or d.dial,
    ring_timeout = number(get("fsbridge_ring_timeout"), d.ring_timeout),
    transport = get("fsbridge_transport") or d.transport,
    domain = get("domain_name"),  -- the call's FreeSWITCH domain: FusionPBX sets it in the domain's context
  }
end

local function joined_args(args)
  local parts = {}
  for i = 1, #args do parts[#parts + 1] = args[i] end
  local text = table.concat(parts, " ")
  if text == "" then return nil end
  return text
end

-- in FreeSWITCH -----------------------------------------------------------------------------------------

function M.run(session, args)
  local function get(name)
    local value = session:getVariable(name)
    if value == nil or value == "" then return nil end
    return value
  end
  local opts = options(get)
  local fallback = joined_args(args or {}) or get("fsbridge_fallback")
  local uuid = get("uuid") or "?"

  local ext, why = M.lookup(get("caller_id_number"), opts)
  if ext and session:ready() then
    -- Without continue_on_fail a busy or unregistered phone makes `bridge` hang up on the caller; with
    -- hangup_after_bridge a finished conversation ends the call instead of falling through to the fallback.
    session:setVariable("continue_on_fail", "true")
    session:setVariable("hangup_after_bridge", "true")
    session:setVariable("originate_disposition", "")
    session:setVariable("fsbridge_manager", ext)
    local dial = M.dial_string(opts.dial, ext, opts.ring_timeout)
    log("info", uuid .. ": ringing the responsible manager " .. ext)
    session:execute("bridge", dial)
    if session:getVariable("originate_disposition") == "SUCCESS" or not session:ready() then
      return "bridged"
    end
    why = "manager " .. ext .. " did not answer (" .. tostring(session:getVariable("originate_disposition")) .. ")"
  end
  if not session:ready() then return "gone" end
  if not fallback then
    log("err", uuid .. ": " .. tostring(why) .. ", and no fsbridge_fallback is set: the dialplan goes on")
    return "no fallback"
  end
  log(string.find(why or "", "^lookup failed") and "warning" or "info", uuid .. ": " .. tostring(why) ..
    "; transferring to " .. fallback)
  session:execute("transfer", fallback)
  return "fallback"
end

-- as a command ------------------------------------------------------------------------------------------

function M.cli(args)
  local phone = args[1]
  local rest = {}
  for i = 2, #args do rest[#rest + 1] = args[i] end
  local opts = options(function(name)
    local value = os.getenv(string.upper(name))
    if value == "" then return nil end
    return value
  end)
  local ext, why = M.lookup(phone, opts)
  if ext then
    print("bridge " .. M.dial_string(opts.dial, ext, opts.ring_timeout))
  else
    io.stderr:write(tostring(why) .. "\n")
    print("fallback " .. (joined_args(rest) or "(none)"))
  end
end

-- A caller is never dropped because of this script: whatever goes wrong in it, the fallback follows.
if session then
  local ok, err = pcall(M.run, session, argv)
  if not ok then
    log("err", "script error: " .. tostring(err))
    local fallback = joined_args(argv or {}) or session:getVariable("fsbridge_fallback")
    if fallback and fallback ~= "" and session:ready() then session:execute("transfer", fallback) end
  end
elseif arg and arg[0] and string.match(arg[0], "fsbridge_route%.lua$") then
  M.cli(arg)
end

return M
