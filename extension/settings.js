// The extension's settings and counters, in one place for the worker, the popup and the options.
export const api = globalThis.browser ?? globalThis.chrome;

export const DEFAULTS = Object.freeze({
  agentUrl: 'http://127.0.0.1:47830',
  token: null,          // the bearer token from pairing; only ever sent to agentUrl
  tokenId: null,
  strength: 'medium',   // 'low' | 'medium' | 'high', as the agent's `--strength`
  onFailure: 'block',   // 'block': stop the upload and ask; 'allow': let the original through
  offSites: [],         // origins where protection is off
  protectedCounts: {},  // origin -> photos protected there
  unprotectedCounts: {},// origin -> photos that went through unprotected there
});

export const STRENGTHS = ['low', 'medium', 'high'];

export async function load() {
  const settings = {...DEFAULTS, ...(await api.storage.local.get(Object.keys(DEFAULTS)))};
  // a strength saved by an older version ('standard') or by hand means the default
  if (!STRENGTHS.includes(settings.strength)) settings.strength = DEFAULTS.strength;
  return settings;
}

export async function save(changes) {
  await api.storage.local.set(changes);
}

export async function bump(field, origin, count) {
  const counts = (await load())[field];
  counts[origin] = (counts[origin] || 0) + count;
  await save({[field]: counts});
}

export function originOf(url) {
  try {
    const parsed = new URL(url);
    return parsed.origin === 'null' ? null : parsed.origin;
  } catch {
    return null;
  }
}
