// An MCP host's view of `ramp-broker mcp`, through the official TypeScript SDK's client
// (@modelcontextprotocol/sdk, what most hosts are built on), for tests/test_mcp_ts.py.
//
// Reads a plan on stdin: {"sessions": [{"connect": {"stdio": {command, args, env, cwd}} or
// {"http": {url, headers}}, "calls": [{tool, arguments}, ...]}, ...]}. For each session it
// connects, lists the tools and makes the calls in order, then prints one JSON object on stdout:
// {"sessions": [{server, tools, calls, stderr}]}. A call the SDK throws on (as it does for a
// result that does not match the tool's output schema) is reported as {"thrown": ...}, not
// raised, so the test shows what a host would have got.

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

// Milliseconds the client waits for any one answer.
const TIMEOUT = 30000;

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

function transportFor(connect) {
  if (connect.stdio) {
    const { command, args, env, cwd } = connect.stdio;
    return new StdioClientTransport({ command, args, env, cwd, stderr: 'pipe' });
  }
  const { url, headers } = connect.http;
  return new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers: headers ?? {} } });
}

function thrown(error) {
  return { thrown: { name: error?.name, code: error?.code, message: String(error?.message ?? error) } };
}

async function runSession({ connect, calls }) {
  const client = new Client({ name: 'ramp-broker-tests', version: '0.0.0' });
  const transport = transportFor(connect);
  let stderr = '';
  transport.stderr?.on('data', (chunk) => { stderr += chunk.toString('utf8'); });
  await client.connect(transport, { timeout: TIMEOUT });
  const out = { server: client.getServerVersion(), tools: [], calls: [] };
  try {
    // listTools also compiles the output schemas callTool checks results against.
    const { tools } = await client.listTools(undefined, { timeout: TIMEOUT });
    out.tools = tools.map((t) => ({ name: t.name, outputSchema: t.outputSchema ?? null }));
    for (const { tool, arguments: args } of calls) {
      try {
        const r = await client.callTool({ name: tool, arguments: args }, undefined, { timeout: TIMEOUT });
        out.calls.push({
          isError: r.isError ?? false,
          structuredContent: r.structuredContent ?? null,
          text: (r.content ?? []).filter((c) => c.type === 'text').map((c) => c.text).join('\n'),
        });
      } catch (error) {
        out.calls.push(thrown(error));
      }
    }
  } finally {
    await client.close();
  }
  out.stderr = stderr;
  return out;
}

const plan = await readStdin();
const sessions = [];
for (const session of plan.sessions) sessions.push(await runSession(session));
process.stdout.write(JSON.stringify({ sessions }) + '\n');
