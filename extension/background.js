// The extension's worker: the only part that talks to the agent (a page's own requests to the
// agent are refused by it; ours carry the extension's origin and the paired token).
import {api, DEFAULTS, load, save, bump, originOf} from './settings.js';

const UNREACHABLE = 'The rgan-agent is not running on this computer. Start it with `agent serve`.';
const NOT_PAIRED = 'This browser is not paired with the rgan-agent. Open the extension options and enter the code from `agent pair`.';

// how long an upload waits in the agent's line (503 busy) before it gives up
const BUSY_PATIENCE_MS = 120000;

class AgentError extends Error {
  constructor(code, message, retry = null) {
    super(message);
    this.code = code;
    // for 503 busy: how long to wait and the ticket that keeps this upload's place in the line
    this.retry = retry;
  }
}

async function call(path, {method = 'GET', body, headers = {}, auth = true} = {}) {
  const settings = await load();
  if (auth && !settings.token) throw new AgentError('not_paired', NOT_PAIRED);
  if (auth) headers = {...headers, Authorization: `Bearer ${settings.token}`};
  let response;
  try {
    response = await fetch(new URL(path, settings.agentUrl), {method, body, headers, credentials: 'omit', cache: 'no-store'});
  } catch {
    throw new AgentError('agent_unreachable', UNREACHABLE);
  }
  if (response.ok) return response;
  let problem = {};
  try {
    problem = await response.json();
  } catch {
    // not the agent's JSON error: keep the status alone
  }
  if (response.status === 401) throw new AgentError('not_paired', problem.message || NOT_PAIRED);
  let retry = null;
  if (response.status === 503) {
    const ms = Number(response.headers.get('X-Retry-After-Ms')) || 1000 * (Number(response.headers.get('Retry-After')) || 1);
    retry = {ms, ticket: response.headers.get('X-Agent-Ticket')};
  }
  throw new AgentError(problem.code || `http_${response.status}`, problem.message || `The agent answered ${response.status}.`, retry);
}

function toBase64(bytes) {
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

async function protect({name, mime, data}, site) {
  const settings = await load();
  const query = new URLSearchParams();
  if (settings.strength !== DEFAULTS.strength) query.set('strength', settings.strength);
  const headers = {'Content-Type': mime || 'application/octet-stream'};
  if (name) headers['X-File-Name'] = encodeURIComponent(name);
  if (site) headers['X-Site'] = site;
  const body = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const giveUp = Date.now() + BUSY_PATIENCE_MS;
  let response;
  for (;;) {
    try {
      response = await call(`/v1/protect?${query}`, {method: 'POST', headers, body});
      break;
    } catch (error) {
      // the agent is busy: wait our turn, and keep our place in its line with the ticket
      if (!error.retry || Date.now() + error.retry.ms > giveUp) throw error;
      if (error.retry.ticket) headers['X-Agent-Ticket'] = error.retry.ticket;
      await new Promise((resolve) => setTimeout(resolve, error.retry.ms));
    }
  }
  const bytes = new Uint8Array(await response.arrayBuffer());
  return {mime: response.headers.get('Content-Type') || mime, data: toBase64(bytes), record: response.headers.get('X-Agent-Record')};
}

async function countForTab(tabId, count) {
  if (tabId === undefined) return;
  const key = `tab:${tabId}`;
  const total = ((await api.storage.session.get(key))[key] || 0) + count;
  await api.storage.session.set({[key]: total});
  await api.action.setBadgeBackgroundColor({tabId, color: '#2e7d32'});
  await api.action.setBadgeText({tabId, text: String(total)});
}

export async function agentState() {
  const settings = await load();
  const state = {agentUrl: settings.agentUrl, connected: false, paired: false, unlocked: false};
  try {
    const status = await (await call('/v1/status', {auth: false})).json();
    Object.assign(state, {connected: true, unlocked: Boolean(status.unlocked), user: status.user, version: status.version});
  } catch (error) {
    return {...state, message: error.message};
  }
  if (!settings.token) return {...state, message: NOT_PAIRED};
  try {
    await call('/v1/records?limit=1');
    state.paired = true;
  } catch (error) {
    state.message = error.message;
  }
  return state;
}

async function pair(code) {
  const response = await call('/v1/pair', {
    method: 'POST', auth: false, headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({code: code.trim(), label: navigator.userAgent.slice(0, 120)}),
  });
  const {token, id} = await response.json();
  await save({token, tokenId: id});
  return {ok: true};
}

const handlers = {
  async protect(message, sender) {
    const site = originOf(sender.tab?.url) || message.site;
    const settings = await load();
    if (site && settings.offSites.includes(site)) return {ok: false, code: 'site_off'};
    try {
      const result = await protect(message, site);
      await bump('protectedCounts', site, 1);
      await countForTab(sender.tab?.id, 1);
      return {ok: true, ...result};
    } catch (error) {
      return {ok: false, code: error.code || 'error', message: error.message, onFailure: settings.onFailure};
    }
  },
  async unprotected(message, sender) {
    const site = originOf(sender.tab?.url) || message.site;
    await bump('unprotectedCounts', site, message.count);
    return {ok: true};
  },
  async state() {
    return agentState();
  },
  async pair(message) {
    try {
      return await pair(message.code);
    } catch (error) {
      return {ok: false, code: error.code, message: error.message};
    }
  },
  async unpair() {
    await save({token: null, tokenId: null});
    return {ok: true};
  },
};

api.runtime.onMessage.addListener((message, sender, reply) => {
  const handler = handlers[message?.type];
  if (!handler || sender.id !== api.runtime.id) return false;
  handler(message, sender).then(reply, (error) => reply({ok: false, code: 'error', message: String(error)}));
  return true;  // the reply comes asynchronously
});

api.tabs?.onRemoved?.addListener((tabId) => api.storage.session.remove(`tab:${tabId}`));
