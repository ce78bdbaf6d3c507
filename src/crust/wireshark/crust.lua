-- crust.lua: Wireshark dissector for crust, the peer-to-peer connectivity library.
--
-- Install with `crust wireshark-plugin --install`, or load it for one run:
--     tshark -X lua_script:$(crust wireshark-plugin) -r capture.pcap -Y crust
--
-- What it decodes (the wire format is described in crust's docs/design.md, "Wire format"):
--   TCP   recognised heuristically on any port by the clear header at the start of a
--         stream ("CRST" | version u8 | network tag 8 bytes); later segments of the stream
--         follow by conversation; length-prefixed messages are reassembled across segments.
--           initiator -> responder: header, u16 len | Noise message 1 (e), u16 len | message 3
--           responder -> initiator: status u8, u16 len | Noise message 2 (e, ee, s, es)
--           both ways afterwards:   u16 len | AEAD record (AES-256-GCM, 16-byte tag)
--         A TCP address echo (port prediction) is a header with version 0xEC and nothing
--         else; the reply is status 3 | IP version u8 | port u16 | address, then the close.
--   QUIC  the same session on the first bidirectional stream; the QUIC dissector hands it to
--         crust when the connection's ALPN is "crust/1/<network>" (preference "networks").
--         QUIC itself is only readable with the TLS secrets: set tls.keylog_file to crust's
--         key log (Config.keylog_file).
--   Keys  with the preference "keylog_file" pointing to the same key log, records are
--         decrypted (lines "CRUST_NOISE <initiator ephemeral> <handshake hash> <key i->r>
--         <key r->i>", 32-byte values in hex) and their frames decoded.  AES is done here in
--         plain Lua (Wireshark 4.0's Lua has no cipher API); the GCM tag is not checked.
--   UDP   crust's clear control datagrams, on any port: hole-punch probes and the address
--         echo ("\x2a" "cp1" | kind | token ...) and the LAN discovery beacon ("\x2b" "cb" |
--         version | kind ...); other kinds plug into
--         _G.crust_dissector.register_udp_message(), see below.

-- Loaded twice (installed plugin and -X lua_script)?  Keep the first copy.
do
    local ok, existing = pcall(Dissector.get, "crust")
    if ok and existing then
        return
    end
end

local MAGIC = "CRST"
local HEADER_LEN = 13
local TAG_LEN = 16
local KNOWN_VERSION = 1
local ECHO_VERSION = 0xEC -- a TCP address echo request instead of a handshake
local ECHO_STATUS = 3 -- its reply: status | IP version u8 | port u16 | address

-- ---------------------------------------------------------------- bit operations
-- bit32 (Lua 5.2, Wireshark < 4.4); Lua 5.3+ operators otherwise (compiled with load()
-- so that a 5.2 parser never sees them).
local band, bor, bxor, rshift, lshift
if bit32 then
    band, bor, bxor, rshift, lshift = bit32.band, bit32.bor, bit32.bxor, bit32.rshift, bit32.lshift
else
    band, bor, bxor, rshift, lshift = load([[
        return function(a, b) return a & b end,
               function(a, b) return a | b end,
               function(a, b) return a ~ b end,
               function(a, n) return (a & 0xffffffff) >> n end,
               function(a, n) return (a << n) & 0xffffffff end
    ]])()
end

-- ---------------------------------------------------------------- AES-256 (encrypt only)
-- GCM decryption only needs the forward cipher: it is CTR mode over the block cipher.
-- The S-box is derived (multiplicative inverse in GF(2^8) followed by the affine map),
-- then four 32-bit lookup tables combine SubBytes, ShiftRows and MixColumns.

local SBOX = {}
do
    local function rotl8(x, n)
        return band(bor(lshift(x, n), rshift(x, 8 - n)), 0xff)
    end
    local p, q = 1, 1
    repeat
        -- p := p * 3 in GF(2^8)
        local hi = band(p, 0x80) ~= 0
        p = band(bxor(p, lshift(p, 1)), 0xff)
        if hi then
            p = bxor(p, 0x1b)
        end
        -- q := q / 3 (so q stays the inverse of p)
        q = bxor(q, lshift(q, 1))
        q = bxor(q, lshift(q, 2))
        q = bxor(q, lshift(q, 4))
        q = band(q, 0xff)
        if band(q, 0x80) ~= 0 then
            q = bxor(q, 0x09)
        end
        local x = bxor(q, rotl8(q, 1), rotl8(q, 2), rotl8(q, 3), rotl8(q, 4))
        SBOX[p] = bxor(x, 0x63)
    until p == 1
    SBOX[0] = 0x63
end

local TE0, TE1, TE2, TE3 = {}, {}, {}, {}
do
    local function xtime(x)
        x = lshift(x, 1)
        if band(x, 0x100) ~= 0 then
            x = bxor(x, 0x11b)
        end
        return x
    end
    for i = 0, 255 do
        local s = SBOX[i]
        local s2 = xtime(s)
        local s3 = bxor(s2, s)
        local w = bor(lshift(s2, 24), lshift(s, 16), lshift(s, 8), s3)
        TE0[i] = w
        w = bor(rshift(w, 8), lshift(band(w, 0xff), 24))
        TE1[i] = w
        w = bor(rshift(w, 8), lshift(band(w, 0xff), 24))
        TE2[i] = w
        w = bor(rshift(w, 8), lshift(band(w, 0xff), 24))
        TE3[i] = w
    end
end

local function sub_word(w)
    return bor(
        lshift(SBOX[rshift(w, 24)], 24),
        lshift(SBOX[band(rshift(w, 16), 0xff)], 16),
        lshift(SBOX[band(rshift(w, 8), 0xff)], 8),
        SBOX[band(w, 0xff)]
    )
end

-- 32-byte key (Lua string) -> 60 round-key words (0-based).
local function aes256_expand(key)
    local w = {}
    for i = 0, 7 do
        local a, b, c, d = key:byte(4 * i + 1, 4 * i + 4)
        w[i] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
    end
    local rcon = 1
    for i = 8, 59 do
        local t = w[i - 1]
        if i % 8 == 0 then
            t = bxor(sub_word(bor(lshift(band(t, 0xffffff), 8), rshift(t, 24))), lshift(rcon, 24))
            rcon = band(lshift(rcon, 1), 0xff)
        elseif i % 8 == 4 then
            t = sub_word(t)
        end
        w[i] = bxor(w[i - 8], t)
    end
    return w
end

-- Encrypt the block (s0, s1, s2, s3) (big-endian words); returns four words.
local function aes256_encrypt(w, s0, s1, s2, s3)
    s0, s1, s2, s3 = bxor(s0, w[0]), bxor(s1, w[1]), bxor(s2, w[2]), bxor(s3, w[3])
    local k = 4
    for _ = 1, 13 do
        local t0 = bxor(TE0[rshift(s0, 24)], TE1[band(rshift(s1, 16), 0xff)],
            TE2[band(rshift(s2, 8), 0xff)], TE3[band(s3, 0xff)], w[k])
        local t1 = bxor(TE0[rshift(s1, 24)], TE1[band(rshift(s2, 16), 0xff)],
            TE2[band(rshift(s3, 8), 0xff)], TE3[band(s0, 0xff)], w[k + 1])
        local t2 = bxor(TE0[rshift(s2, 24)], TE1[band(rshift(s3, 16), 0xff)],
            TE2[band(rshift(s0, 8), 0xff)], TE3[band(s1, 0xff)], w[k + 2])
        local t3 = bxor(TE0[rshift(s3, 24)], TE1[band(rshift(s0, 16), 0xff)],
            TE2[band(rshift(s1, 8), 0xff)], TE3[band(s2, 0xff)], w[k + 3])
        s0, s1, s2, s3 = t0, t1, t2, t3
        k = k + 4
    end
    local function last(a, b, c, d, rk)
        return bxor(bor(lshift(SBOX[rshift(a, 24)], 24), lshift(SBOX[band(rshift(b, 16), 0xff)], 16),
            lshift(SBOX[band(rshift(c, 8), 0xff)], 8), SBOX[band(d, 0xff)]), rk)
    end
    return last(s0, s1, s2, s3, w[56]), last(s1, s2, s3, s0, w[57]),
        last(s2, s3, s0, s1, w[58]), last(s3, s0, s1, s2, w[59])
end

-- AES-256-GCM decryption without tag check: CTR from inc32(J0), J0 = nonce || 1.
-- crust's Noise nonce is 4 zero bytes then the 64-bit big-endian record counter.
local function gcm_decrypt(round_keys, counter, ciphertext)
    local n_hi = math.floor(counter / 4294967296)
    local n_lo = counter % 4294967296
    local out = {}
    local len = #ciphertext
    local block = 2
    local byte, char = string.byte, string.char
    local full_end = len - len % 16
    for pos = 1, full_end, 16 do
        local k0, k1, k2, k3 = aes256_encrypt(round_keys, 0, n_hi, n_lo, block)
        block = block + 1
        local c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16 =
            byte(ciphertext, pos, pos + 15)
        out[#out + 1] = char(
            bxor(c1, rshift(k0, 24)), bxor(c2, band(rshift(k0, 16), 0xff)),
            bxor(c3, band(rshift(k0, 8), 0xff)), bxor(c4, band(k0, 0xff)),
            bxor(c5, rshift(k1, 24)), bxor(c6, band(rshift(k1, 16), 0xff)),
            bxor(c7, band(rshift(k1, 8), 0xff)), bxor(c8, band(k1, 0xff)),
            bxor(c9, rshift(k2, 24)), bxor(c10, band(rshift(k2, 16), 0xff)),
            bxor(c11, band(rshift(k2, 8), 0xff)), bxor(c12, band(k2, 0xff)),
            bxor(c13, rshift(k3, 24)), bxor(c14, band(rshift(k3, 16), 0xff)),
            bxor(c15, band(rshift(k3, 8), 0xff)), bxor(c16, band(k3, 0xff)))
    end
    if full_end < len then
        local ks = { aes256_encrypt(round_keys, 0, n_hi, n_lo, block) }
        local tail = {}
        for i = 0, len - full_end - 1 do
            local kb = band(rshift(ks[rshift(i, 2) + 1], 24 - 8 * (i % 4)), 0xff)
            tail[i + 1] = bxor(byte(ciphertext, full_end + 1 + i), kb)
        end
        out[#out + 1] = char(table.unpack(tail))
    end
    return table.concat(out)
end

-- ---------------------------------------------------------------- protocol and fields

local crust = Proto("crust", "crust peer-to-peer protocol")

local STATUS = { [0] = "OK", [1] = "network mismatch", [2] = "version unsupported",
    [3] = "address echo" }
local DIRECTION = { [0] = "initiator to responder", [1] = "responder to initiator" }
local HANDSHAKE = { [1] = "-> e", [2] = "<- e, ee, s, es", [3] = "-> s, se" }
local KIND = {
    [1] = "MSG", [2] = "FIRST", [3] = "MORE", [4] = "LAST", [5] = "SMSG", [6] = "SFIRST",
    [16] = "PING", [17] = "PONG",
    [32] = "CLOSE", [33] = "SELECT", [34] = "ACCEPT", [48] = "CONTROL",
}
local CLOSE_CODE = {
    [0] = "normal", [1] = "duplicate", [2] = "replaced", [3] = "protocol error",
    [4] = "blacklisted", [5] = "shutdown", [6] = "self", [7] = "limit", [8] = "timeout",
}

local F = {
    magic = ProtoField.string("crust.magic", "Magic"),
    version = ProtoField.uint8("crust.version", "Version"),
    network_tag = ProtoField.bytes("crust.network_tag", "Network tag"),
    direction = ProtoField.uint8("crust.direction", "Direction", base.DEC, DIRECTION),
    transport = ProtoField.string("crust.transport", "Transport"),
    status = ProtoField.uint8("crust.status", "Handshake status", base.DEC, STATUS),
    hs_message = ProtoField.uint8("crust.handshake.message", "Handshake message", base.DEC, HANDSHAKE),
    hs_length = ProtoField.uint16("crust.handshake.length", "Handshake message length"),
    hs_ephemeral = ProtoField.bytes("crust.handshake.ephemeral", "Ephemeral public key (clear)"),
    hs_static = ProtoField.bytes("crust.handshake.static", "Static public key (encrypted)"),
    hs_payload = ProtoField.bytes("crust.handshake.payload", "Payload (hello, encrypted)"),
    rec_length = ProtoField.uint16("crust.record.length", "Record length"),
    rec_number = ProtoField.uint64("crust.record.number", "Record number (nonce)"),
    rec_ciphertext = ProtoField.bytes("crust.record.ciphertext", "Ciphertext"),
    rec_tag = ProtoField.bytes("crust.record.tag", "AEAD tag"),
    rec_decrypted = ProtoField.bool("crust.record.decrypted", "Decrypted"),
    frame = ProtoField.none("crust.frame", "Frame"),
    fr_kind = ProtoField.uint8("crust.frame.kind", "Kind", base.DEC, KIND),
    fr_priority = ProtoField.uint8("crust.frame.priority", "Priority"),
    fr_length = ProtoField.uint32("crust.frame.length", "Length"),
    fr_total = ProtoField.uint32("crust.frame.total", "Message length (all fragments)"),
    fr_body = ProtoField.bytes("crust.frame.body", "Body"),
    fr_text = ProtoField.string("crust.frame.text", "Body as text"),
    fr_token = ProtoField.uint64("crust.frame.token", "Ping token"),
    fr_close_code = ProtoField.uint8("crust.frame.close_code", "Close code", base.DEC, CLOSE_CODE),
    fr_close_reason = ProtoField.string("crust.frame.close_reason", "Close reason"),
    data = ProtoField.bytes("crust.data", "Data after the handshake failed"),
    other_stream = ProtoField.bytes("crust.quic.other_stream", "Data on another QUIC stream"),
    punch_kind = ProtoField.uint8("crust.punch.kind", "Punch datagram", base.DEC,
        { [1] = "PROBE", [2] = "ACK", [3] = "ECHO_REQUEST", [4] = "ECHO_REPLY" }),
    punch_token = ProtoField.bytes("crust.punch.token", "Token"),
    punch_padding = ProtoField.bytes("crust.punch.padding", "Padding"),
    punch_family = ProtoField.uint8("crust.punch.family", "Address seen: IP version"),
    punch_port = ProtoField.uint16("crust.punch.port", "Address seen: port"),
    punch_ipv4 = ProtoField.ipv4("crust.punch.ipv4", "Address seen: IPv4"),
    punch_ipv6 = ProtoField.ipv6("crust.punch.ipv6", "Address seen: IPv6"),
    beacon_version = ProtoField.uint8("crust.beacon.version", "Beacon version"),
    beacon_kind = ProtoField.uint8("crust.beacon.kind", "Beacon kind", base.DEC,
        { [1] = "ANNOUNCE", [2] = "QUERY" }),
    beacon_network = ProtoField.bytes("crust.beacon.network", "Network tag"),
    beacon_peer = ProtoField.bytes("crust.beacon.peer", "Peer id (Ed25519 key)"),
    beacon_timestamp = ProtoField.uint64("crust.beacon.timestamp", "Timestamp (ms since 1970)"),
    beacon_nonce = ProtoField.bytes("crust.beacon.nonce", "Nonce"),
    beacon_count = ProtoField.uint8("crust.beacon.contact_count", "Contacts"),
    beacon_contact = ProtoField.string("crust.beacon.contact", "Contact"),
    beacon_signature = ProtoField.bytes("crust.beacon.signature", "Signature (Ed25519)"),
}
crust.fields = {}
for _, field in pairs(F) do
    table.insert(crust.fields, field)
end

local E = {
    malformed = ProtoExpert.new("crust.malformed", "Malformed crust data",
        expert.group.MALFORMED, expert.severity.ERROR),
    version = ProtoExpert.new("crust.version.unknown", "Protocol version this dissector does not know",
        expert.group.PROTOCOL, expert.severity.WARN),
    refused = ProtoExpert.new("crust.status.refused", "The responder refused the handshake",
        expert.group.SEQUENCE, expert.severity.WARN),
    nokey = ProtoExpert.new("crust.record.nokey", "No key for this session in the key log",
        expert.group.DECRYPTION, expert.severity.NOTE),
}
crust.experts = { E.malformed, E.version, E.refused, E.nokey }

crust.prefs.keylog_file = Pref.string("Key log file", "",
    "crust's key log (Config.keylog_file): CRUST_NOISE lines let the dissector decrypt records")
crust.prefs.networks = Pref.string("Networks (QUIC)", "crust",
    "Comma-separated crust network names (or full ALPN strings) whose QUIC connections are dissected")
crust.prefs.decrypt = Pref.bool("Decrypt records", true,
    "Decrypt records whose keys are in the key log (plain-Lua AES: slow for large captures)")

local f_quic_stream_id = Field.new("quic.stream.stream_id")

-- ---------------------------------------------------------------- key log

local keylog = { path = nil, size = -1, keys = {} }

local function hex_to_bin(hex)
    return (hex:gsub("..", function(pair)
        return string.char(tonumber(pair, 16))
    end))
end

-- (Re)read the key log when its path or size changed since the last read.
local function load_keylog()
    local path = crust.prefs.keylog_file
    if path == nil or path == "" then
        keylog.keys, keylog.path, keylog.size = {}, nil, -1
        return
    end
    local file = io.open(path, "r")
    if not file then
        return
    end
    local size = file:seek("end")
    if path == keylog.path and size == keylog.size then
        file:close()
        return
    end
    file:seek("set", 0)
    local keys = {}
    for line in file:lines() do
        local ephemeral, hash, k1, k2 = line:match(
            "^CRUST_NOISE%s+(%x+)%s+(%x+)%s+(%x+)%s+(%x+)%s*$")
        if ephemeral and #ephemeral == 64 and #k1 == 64 and #k2 == 64 then
            keys[ephemeral:lower()] = {
                hash = hash:lower(),
                [0] = aes256_expand(hex_to_bin(k1)),
                [1] = aes256_expand(hex_to_bin(k2)),
            }
        end
    end
    file:close()
    keylog.keys, keylog.path, keylog.size = keys, path, size
end

local function keys_for(ephemeral_hex)
    if ephemeral_hex == nil then
        return nil
    end
    local keys = keylog.keys[ephemeral_hex]
    if keys == nil then
        load_keylog()
        keys = keylog.keys[ephemeral_hex]
    end
    return keys
end

-- ---------------------------------------------------------------- session state
-- A session is found by its address/port pair (Field extractors such as tcp.stream are
-- not available when Wireshark dissects without a tree).  The first pass (pinfo.visited
-- false) walks each direction in order and records what every piece of data is; later
-- passes (GUI clicks, tshark -2) read that record back.

local HEADER, MSG1, MSG3, STATUS_PHASE, MSG2, RECORDS, ENDED = 1, 2, 3, 4, 5, 6, 7
local PT_TCP = 2
local sessions = {}
local seen = {}
local plaintexts = {}

function crust.init()
    sessions = {}
    seen = {}
    plaintexts = {}
    keylog.path, keylog.size, keylog.keys = nil, -1, {}
end

local function endpoint(pinfo)
    return tostring(pinfo.src) .. "|" .. tostring(pinfo.src_port)
end

local function session_id(pinfo)
    local a = endpoint(pinfo)
    local b = tostring(pinfo.dst) .. "|" .. tostring(pinfo.dst_port)
    local kind = pinfo.port_type == PT_TCP and "tcp" or "quic"
    if a < b then
        return kind .. " " .. a .. " " .. b
    end
    return kind .. " " .. b .. " " .. a
end

local function new_session(pinfo, transport)
    return {
        transport = transport,
        initiator = endpoint(pinfo),
        ephemeral = nil,
        [0] = { phase = HEADER, records = 0, chunks = {}, buffered = 0, need = 0 },
        [1] = { phase = STATUS_PHASE, records = 0, chunks = {}, buffered = 0, need = 0 },
    }
end

-- Bytes the PDU at offset needs, or nil plus how many more bytes are missing.
local function pdu_size(tvb, offset, phase)
    local avail = tvb:len() - offset
    local need
    if phase == HEADER then
        need = HEADER_LEN
    elseif phase == STATUS_PHASE then
        need = 1
        if avail >= 1 and tvb(offset, 1):uint() == ECHO_STATUS then
            if avail < 2 then
                return nil, 1
            end
            need = tvb(offset + 1, 1):uint() == 6 and 20 or 8
        end
    elseif phase == ENDED then
        return avail
    else
        if avail < 2 then
            return nil, DESEGMENT_ONE_MORE_SEGMENT
        end
        need = 2 + tvb(offset, 2):uint()
    end
    if avail < need then
        return nil, need - avail
    end
    return need
end

local function next_phase(phase, tvb, offset)
    if phase == HEADER then
        if tvb(offset + 4, 1):uint() == ECHO_VERSION then
            return ENDED -- the echo request is the whole stream
        end
        return MSG1
    elseif phase == MSG1 then
        return MSG3
    elseif phase == MSG3 then
        return RECORDS
    elseif phase == STATUS_PHASE then
        if tvb(offset, 1):uint() == 0 then
            return MSG2
        end
        return ENDED
    elseif phase == MSG2 then
        return RECORDS
    end
    return phase
end

-- First pass: the complete PDUs of tvb from offset on, advancing the direction's state.
-- Returns the list, where the unparsed rest starts and how many bytes it lacks (or nil).
local function parse_pdus(tvb, offset, state, session)
    local list = {}
    local len = tvb:len()
    while offset < len do
        local size, missing = pdu_size(tvb, offset, state.phase)
        if size == nil then
            return list, offset, missing
        end
        local phase = state.phase
        list[#list + 1] = { phase = phase, offset = offset, size = size, number = state.records }
        if phase == RECORDS then
            state.records = state.records + 1
        elseif phase == MSG1 and size >= 34 then
            session.ephemeral = tostring(tvb(offset + 2, 32):bytes()):lower()
        end
        state.phase = next_phase(phase, tvb, offset)
        offset = offset + size
    end
    return list, offset, nil
end

-- ---------------------------------------------------------------- PDU dissectors

local function add_info(pinfo, text)
    local info = tostring(pinfo.cols.info)
    if pinfo.private["crust_info"] == "1" and info ~= "" then
        pinfo.cols.info:append(", " .. text)
    else
        pinfo.cols.info:set(text)
        pinfo.private["crust_info"] = "1"
    end
end

local function dissect_header(tvb, pinfo, tree, offset)
    local t = tree:add(crust, tvb(offset, HEADER_LEN), "Header")
    t:add(F.magic, tvb(offset, 4))
    local vitem = t:add(F.version, tvb(offset + 4, 1))
    local version = tvb(offset + 4, 1):uint()
    t:add(F.network_tag, tvb(offset + 5, 8))
    local net = " net " .. tostring(tvb(offset + 5, 8):bytes())
    if version == ECHO_VERSION then
        add_info(pinfo, "Address echo request" .. net)
        return
    end
    if version ~= KNOWN_VERSION then
        vitem:add_proto_expert_info(E.version)
    end
    add_info(pinfo, "Header v" .. version .. net)
end

-- The address a node saw a TCP address echo come from (the same fields as a UDP echo reply).
local function dissect_echo_reply(tvb, pinfo, tree, offset, size)
    local family = tvb(offset + 1, 1):uint()
    if (family ~= 4 and family ~= 6) or size ~= (family == 6 and 20 or 8) then
        tree:add_proto_expert_info(E.malformed, "bad address in an echo reply")
        return
    end
    tree:add(F.punch_family, tvb(offset + 1, 1))
    tree:add(F.punch_port, tvb(offset + 2, 2))
    local port = tvb(offset + 2, 2):uint()
    if family == 4 then
        tree:add(F.punch_ipv4, tvb(offset + 4, 4))
        add_info(pinfo, "Address echo reply " .. tostring(tvb(offset + 4, 4):ipv4()) .. ":" .. port)
    else
        tree:add(F.punch_ipv6, tvb(offset + 4, 16))
        add_info(pinfo, "Address echo reply [" .. tostring(tvb(offset + 4, 16):ipv6()) .. "]:" .. port)
    end
end

local function dissect_status(tvb, pinfo, tree, offset, size)
    local item = tree:add(F.status, tvb(offset, 1))
    local status = tvb(offset, 1):uint()
    if status == ECHO_STATUS then
        dissect_echo_reply(tvb, pinfo, tree, offset, size)
        return
    end
    if status ~= 0 then
        item:add_proto_expert_info(E.refused)
    end
    add_info(pinfo, "Status " .. (STATUS[status] or tostring(status)))
end

local function dissect_handshake(tvb, pinfo, tree, offset, size, index)
    local n = size - 2
    local t = tree:add(crust, tvb(offset, size), "Handshake message " .. index)
    t:add(F.hs_message, index):set_generated()
    t:add(F.hs_length, tvb(offset, 2))
    local pos = offset + 2
    local rest = n
    if index == 1 or index == 2 then
        if rest < 32 then
            t:add_proto_expert_info(E.malformed, "shorter than an ephemeral key")
            return
        end
        t:add(F.hs_ephemeral, tvb(pos, 32))
        pos, rest = pos + 32, rest - 32
    end
    if index == 2 or index == 3 then
        if rest < 32 + TAG_LEN + TAG_LEN then
            t:add_proto_expert_info(E.malformed, "shorter than an encrypted static key and payload tag")
            return
        end
        t:add(F.hs_static, tvb(pos, 32 + TAG_LEN))
        pos, rest = pos + 32 + TAG_LEN, rest - 32 - TAG_LEN
    end
    if rest > 0 then
        t:add(F.hs_payload, tvb(pos, rest))
    end
    add_info(pinfo, "Handshake " .. index .. " (" .. HANDSHAKE[index] .. ")")
end

local function dissect_frames(ptvb, pinfo, tree)
    local pos, size = 0, ptvb:len()
    local names = {}
    while pos < size do
        if size - pos < 6 then
            tree:add_proto_expert_info(E.malformed, "truncated frame header")
            break
        end
        local kind = ptvb(pos, 1):uint()
        local length = ptvb(pos + 2, 4):uint()
        local whole = math.min(6 + length, size - pos)
        local name = KIND[kind] or ("kind " .. kind)
        local t = tree:add(F.frame, ptvb(pos, whole))
        t:set_text("Frame " .. name .. ", priority " .. ptvb(pos + 1, 1):uint() .. ", " .. length .. " bytes")
        t:add(F.fr_kind, ptvb(pos, 1))
        t:add(F.fr_priority, ptvb(pos + 1, 1))
        t:add(F.fr_length, ptvb(pos + 2, 4))
        if 6 + length > size - pos then
            t:add_proto_expert_info(E.malformed, "frame longer than its record")
            break
        end
        local body = pos + 6
        if length > 0 then
            if kind == 2 and length >= 4 then
                t:add(F.fr_total, ptvb(body, 4))
                if length > 4 then
                    t:add(F.fr_body, ptvb(body + 4, length - 4))
                end
            elseif (kind == 16 or kind == 17) and length == 8 then
                t:add(F.fr_token, ptvb(body, 8))
            elseif kind == 32 then
                t:add(F.fr_close_code, ptvb(body, 1))
                if length > 1 then
                    t:add(F.fr_close_reason, ptvb(body + 1, length - 1))
                end
            else
                t:add(F.fr_body, ptvb(body, length))
                if kind == 1 and length <= 256 then
                    local raw = ptvb(body, length):raw()
                    if not raw:find("[^\32-\126\t\r\n]") then
                        t:add(F.fr_text, ptvb(body, length))
                    end
                end
            end
        end
        names[#names + 1] = name
        pos = pos + 6 + length
    end
    return names
end

local function dissect_record(tvb, pinfo, tree, offset, size, dir, number, session, key)
    local n = size - 2
    local t = tree:add(crust, tvb(offset, size), "Record " .. number .. " (" .. n .. " bytes)")
    t:add(F.rec_length, tvb(offset, 2))
    t:add(F.rec_number, UInt64(number)):set_generated()
    if n < TAG_LEN then
        t:add_proto_expert_info(E.malformed, "record shorter than its tag")
        add_info(pinfo, "Record")
        return
    end
    if n > TAG_LEN then
        t:add(F.rec_ciphertext, tvb(offset + 2, n - TAG_LEN))
    end
    t:add(F.rec_tag, tvb(offset + 2 + n - TAG_LEN, TAG_LEN))
    local plain = plaintexts[key]
    if n == TAG_LEN then
        plain = ""
    end
    if plain == nil and crust.prefs.decrypt then
        local keys = keys_for(session.ephemeral)
        if keys ~= nil then
            plain = gcm_decrypt(keys[dir], number, tvb(offset + 2, n - TAG_LEN):raw())
            plaintexts[key] = plain
        elseif crust.prefs.keylog_file ~= "" then
            t:add_proto_expert_info(E.nokey)
        end
    end
    t:add(F.rec_decrypted, plain ~= nil):set_generated()
    if plain == nil then
        add_info(pinfo, "Record " .. n)
        return
    end
    local ptvb = ByteArray.new(plain, true):tvb("Decrypted crust record")
    local names = dissect_frames(ptvb, pinfo, t)
    add_info(pinfo, table.concat(names, " "))
end

-- ---------------------------------------------------------------- stream dissection

-- Show the PDUs of list (found in tvb) under one crust tree item.
local function show_pdus(tvb, pinfo, tree, session, dir, list, key)
    if #list == 0 then
        return
    end
    pinfo.cols.protocol = "crust"
    local root = tree:add(crust, tvb(), "crust")
    root:add(F.direction, dir):set_generated()
    root:add(F.transport, session.transport):set_generated()
    for i, pdu in ipairs(list) do
        local phase, offset, size = pdu.phase, pdu.offset, pdu.size
        if phase == HEADER then
            dissect_header(tvb, pinfo, root, offset)
        elseif phase == STATUS_PHASE then
            dissect_status(tvb, pinfo, root, offset, size)
        elseif phase == MSG1 then
            dissect_handshake(tvb, pinfo, root, offset, size, 1)
        elseif phase == MSG2 then
            dissect_handshake(tvb, pinfo, root, offset, size, 2)
        elseif phase == MSG3 then
            dissect_handshake(tvb, pinfo, root, offset, size, 3)
        elseif phase == RECORDS then
            dissect_record(tvb, pinfo, root, offset, size, dir, pdu.number, session, key .. "#" .. i)
        else
            root:add(F.data, tvb(offset, size))
            add_info(pinfo, "Data")
        end
    end
end

-- What identifies one call for this packet across passes.
local function call_key(tvb, pinfo)
    local len = tvb:len()
    return pinfo.number .. ":" .. len .. ":" .. tostring(tvb(0, math.min(len, 8)):bytes())
end

-- TCP: Wireshark's TCP reassembly collects what a PDU needs (desegment_len).
local function dissect_tcp(tvb, pinfo, tree, session)
    local key = call_key(tvb, pinfo)
    local entry = seen[key]
    if entry == nil then
        if pinfo.visited then
            return 0
        end
        local dir = endpoint(pinfo) == session.initiator and 0 or 1
        local list, stop, missing = parse_pdus(tvb, 0, session[dir], session)
        entry = { dir = dir, list = list, stop = stop, missing = missing }
        seen[key] = entry
    end
    show_pdus(tvb, pinfo, tree, session, entry.dir, entry.list, key)
    if entry.missing ~= nil then
        pinfo.desegment_offset = entry.stop
        pinfo.desegment_len = entry.missing
    end
    return tvb:len()
end

-- QUIC: the stream is reassembled here (Wireshark 4.0's QUIC reassembly does not hand
-- a Lua dissector its reassembled data); STREAM data is assumed in order, without
-- retransmissions, as on loopback and most clean captures.
local function dissect_quic(tvb, pinfo, tree, session)
    local key = call_key(tvb, pinfo)
    local entry = seen[key]
    if entry == nil then
        if pinfo.visited then
            return 0
        end
        local dir = endpoint(pinfo) == session.initiator and 0 or 1
        local state = session[dir]
        entry = { dir = dir, list = {} }
        seen[key] = entry
        local data = tvb:raw()
        if state.buffered > 0 then
            table.insert(state.chunks, data)
            state.buffered = state.buffered + #data
            if state.buffered < state.need then
                return tvb:len() -- still inside a PDU that started earlier
            end
            data = table.concat(state.chunks)
            entry.data = data
        end
        local ptvb = entry.data and ByteArray.new(data, true):tvb("Reassembled crust") or tvb
        local list, stop, missing = parse_pdus(ptvb, 0, state, session)
        entry.list = list
        state.chunks, state.buffered, state.need = {}, 0, 0
        if missing ~= nil then
            local rest = data:sub(stop + 1)
            state.chunks = { rest }
            state.buffered = #rest
            state.need = missing == DESEGMENT_ONE_MORE_SEGMENT and #rest + 1 or #rest + missing
        end
    end
    local ptvb = tvb
    if entry.data ~= nil then
        ptvb = ByteArray.new(entry.data, true):tvb("Reassembled crust")
    end
    show_pdus(ptvb, pinfo, tree, session, entry.dir, entry.list, key)
    return tvb:len()
end

local function looks_like_header(tvb)
    if tvb:len() < 5 or tvb(0, 4):raw() ~= MAGIC then
        return false
    end
    -- message 1 (at least the 32-byte ephemeral key) follows the header
    return tvb:len() < HEADER_LEN + 2 or tvb(HEADER_LEN, 2):uint() >= 32
end

-- The session this packet belongs to; a clear header starts a new one (also when an
-- address/port pair is reused by a later connection of the same initiator).
local function find_session(tvb, pinfo, transport)
    local id = session_id(pinfo)
    local session = sessions[id]
    if not pinfo.visited and looks_like_header(tvb) and (session == nil
        or (session[0].phase ~= HEADER and session.initiator == endpoint(pinfo))) then
        session = new_session(pinfo, transport)
        sessions[id] = session
    end
    return session
end

-- Called for the rest of a TCP stream once the heuristic has claimed it, and by the QUIC
-- dissector for the stream data of connections whose ALPN is a crust one.
function crust.dissector(tvb, pinfo, tree)
    if tvb:len() == 0 then
        return 0
    end
    if pinfo.port_type == PT_TCP then
        local session = find_session(tvb, pinfo, "tcp")
        if session == nil then
            return 0
        end
        return dissect_tcp(tvb, pinfo, tree, session)
    end
    local ids = { f_quic_stream_id() }
    local stream_id = ids[#ids] and ids[#ids].value or nil
    if stream_id ~= nil and tostring(stream_id) ~= "0" then
        tree:add(crust, tvb(), "crust (not the session stream)"):add(F.other_stream, tvb())
        return tvb:len()
    end
    local session = find_session(tvb, pinfo, "quic")
    if session == nil then
        return 0
    end
    return dissect_quic(tvb, pinfo, tree, session)
end

local function heuristic_tcp(tvb, pinfo, tree)
    if not looks_like_header(tvb) then
        return false
    end
    local session = find_session(tvb, pinfo, "tcp")
    if session == nil then
        return false
    end
    pinfo.conversation = crust
    dissect_tcp(tvb, pinfo, tree, session)
    return true
end
crust:register_heuristic("tcp", heuristic_tcp)

-- ---------------------------------------------------------------- QUIC

local registered_alpns = {}

local function register_alpns()
    local ok, table_ = pcall(DissectorTable.get, "quic.proto")
    if not ok or table_ == nil then
        return -- a Wireshark without QUIC: TCP only
    end
    for _, alpn in ipairs(registered_alpns) do
        table_:remove(alpn, crust)
    end
    registered_alpns = {}
    for name in string.gmatch(crust.prefs.networks or "", "[^,]+") do
        name = name:match("^%s*(.-)%s*$")
        if name ~= "" then
            local alpn = name:find("/", 1, true) and name or ("crust/1/" .. name)
            table_:add(alpn, crust)
            registered_alpns[#registered_alpns + 1] = alpn
        end
    end
end

function crust.prefs_changed()
    register_alpns()
    keylog.path, keylog.size, keylog.keys = nil, -1, {}
end

register_alpns()

-- ---------------------------------------------------------------- UDP control datagrams
-- crust's clear UDP control datagrams share the QUIC socket, so a control datagram's first
-- byte has both top bits clear (neither QUIC's long-header bit 0x80 nor its fixed bit 0x40).
-- Each kind is described with
--     _G.crust_dissector.register_udp_message(prefix, name, function(tvb, pinfo, tree) ... end)
-- where prefix is the clear bytes that start every datagram of that kind; the heuristic
-- below then claims such datagrams on any UDP port and calls the function.

local udp_messages = {}
local udp_heuristic_registered = false

local function heuristic_udp(tvb, pinfo, tree)
    local len = tvb:len()
    for _, msg in ipairs(udp_messages) do
        local n = #msg.prefix
        if len >= n and tvb(0, n):raw() == msg.prefix then
            pinfo.cols.protocol = "crust"
            pinfo.cols.info:set(msg.name)
            local t = tree:add(crust, tvb(), "crust " .. msg.name)
            t:add(F.transport, "udp"):set_generated()
            msg.dissect(tvb, pinfo, t)
            return true
        end
    end
    return false
end

-- Each Lua script has its own globals in Wireshark: the hook lives in _G.
local api = rawget(_G, "crust_dissector") or {}
_G.crust_dissector = api

function api.register_udp_message(prefix, name, dissect)
    assert(type(prefix) == "string" and #prefix > 0, "prefix: non-empty string")
    assert(prefix:byte(1) < 0x40, "prefix: first byte must have both top bits clear")
    table.insert(udp_messages, { prefix = prefix, name = name, dissect = dissect })
    if not udp_heuristic_registered then
        crust:register_heuristic("udp", heuristic_udp)
        udp_heuristic_registered = true
    end
end

-- Hole punching and address echo: "\x2a" "cp1" | kind u8 | token (16 bytes); an ECHO_REQUEST
-- is padded with 24 zero bytes, an ECHO_REPLY carries the address seen: IP version u8 (4 or
-- 6) | port u16 | address (4 or 16 bytes).
local PUNCH_KINDS = { [1] = "PROBE", [2] = "ACK", [3] = "ECHO_REQUEST", [4] = "ECHO_REPLY" }

api.register_udp_message("\42cp1", "punch", function(tvb, pinfo, tree)
    local len = tvb:len()
    if len < 21 then
        tree:add_proto_expert_info(E.malformed, "shorter than a punch datagram")
        return
    end
    local kind = tvb(4, 1):uint()
    tree:add(F.punch_kind, tvb(4, 1))
    tree:add(F.punch_token, tvb(5, 16))
    local text = "Punch " .. (PUNCH_KINDS[kind] or ("kind " .. kind))
    if kind == 3 and len > 21 then
        tree:add(F.punch_padding, tvb(21))
    elseif kind == 4 then
        local family = len >= 22 and tvb(21, 1):uint() or 0
        local want = family == 4 and 28 or family == 6 and 40 or -1
        if len ~= want then
            tree:add_proto_expert_info(E.malformed, "bad address in an echo reply")
        else
            tree:add(F.punch_family, tvb(21, 1))
            tree:add(F.punch_port, tvb(22, 2))
            if family == 4 then
                tree:add(F.punch_ipv4, tvb(24, 4))
                text = text .. " " .. tostring(tvb(24, 4):ipv4()) .. ":" .. tvb(22, 2):uint()
            else
                tree:add(F.punch_ipv6, tvb(24, 16))
                text = text .. " [" .. tostring(tvb(24, 16):ipv6()) .. "]:" .. tvb(22, 2):uint()
            end
        end
    elseif len > 21 then
        tree:add_proto_expert_info(E.malformed, "trailing bytes in a punch datagram")
    end
    pinfo.cols.info:set(text)
end)

-- LAN discovery beacon: "\x2b" "cb" | version u8 | kind u8 (1 ANNOUNCE, 2 QUERY) | network tag
-- (8) | peer id (32) | timestamp ms u64 | nonce (8) | contact count u8 | (length u8 | contact
-- utf-8)* | Ed25519 signature (64) over "crust beacon\0" and everything before it.
local BEACON_KINDS = { [1] = "ANNOUNCE", [2] = "QUERY" }
local BEACON_HEAD = 62

api.register_udp_message("\43cb", "beacon", function(tvb, pinfo, tree)
    local len = tvb:len()
    if len < BEACON_HEAD + 64 then
        tree:add_proto_expert_info(E.malformed, "shorter than a beacon")
        return
    end
    tree:add(F.beacon_version, tvb(3, 1))
    if tvb(3, 1):uint() ~= 1 then
        tree:add_proto_expert_info(E.version)
        return
    end
    local kind = tvb(4, 1):uint()
    tree:add(F.beacon_kind, tvb(4, 1))
    tree:add(F.beacon_network, tvb(5, 8))
    tree:add(F.beacon_peer, tvb(13, 32))
    tree:add(F.beacon_timestamp, tvb(45, 8))
    tree:add(F.beacon_nonce, tvb(53, 8))
    tree:add(F.beacon_count, tvb(61, 1))
    local count = tvb(61, 1):uint()
    local stop = len - 64
    local pos = BEACON_HEAD
    for _ = 1, count do
        local n = pos < stop and tvb(pos, 1):uint() or 0
        if n == 0 or pos + 1 + n > stop then
            tree:add_proto_expert_info(E.malformed, "bad contact in a beacon")
            return
        end
        tree:add(F.beacon_contact, tvb(pos + 1, n))
        pos = pos + 1 + n
    end
    if pos ~= stop then
        tree:add_proto_expert_info(E.malformed, "trailing bytes in a beacon")
        return
    end
    tree:add(F.beacon_signature, tvb(stop, 64))
    pinfo.cols.info:set("Beacon " .. (BEACON_KINDS[kind] or ("kind " .. kind)) .. ", "
        .. count .. " contact(s)")
end)
