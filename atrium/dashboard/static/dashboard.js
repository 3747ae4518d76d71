// Atrium live dashboard: pipeline totals and a deal board that stay live.
//
// No build step and no dependency. Reads and sign-in are GraphQL over HTTP on /graphql; live
// updates come over graphql-transport-ws (the protocol of the graphql-ws library) on the same path,
// with the token in connection_init, exactly as any other client.
//
// Consistency: a board is a snapshot plus the dealBoard events since. Every event stream starts
// with a Resync (the server sends another after a gap in its own feed, and a reconnect subscribes
// afresh, so it gets one too). On each, the board refetches while it buffers events, then replays
// them over the snapshot. Events carry the deal's version and an older one never overwrites a newer
// state: events of one deal published by two server processes may arrive out of order.

const GRAPHQL = '/graphql';
const TOKEN_KEY = 'atrium.dashboard.token';
const CARDS_PER_STAGE = 50; // counts and totals come from pipelineSummary, not from the cards shown

const DEAL = 'id title amount currency status version createdAt stage { id } pipeline { id } company { name } owner { name }';
const VIEWER = `query DashboardViewer {
  me { name email } tenant { name }
  pipelines { id name stages { id name } }
}`;
const SNAPSHOT = `query DashboardBoard($id: ID!, $cards: Int!) {
  pipeline(id: $id) { id name stages { id name deals(first: $cards) { ${DEAL} } } }
}`;
const LOGIN = `mutation DashboardLogin($email: String!, $password: String!, $tenant: String!) {
  login(email: $email, password: $password, tenant: $tenant) { token }
}`;
const SUMMARY = `subscription DashboardTotals($id: ID!) {
  pipelineSummary(pipelineId: $id) { timestamp totals { stage { id } currency count total weightedTotal } }
}`;
const BOARD = `subscription DashboardDeals($id: ID!) {
  dealBoard(pipelineId: $id) {
    __typename
    ... on Resync { reason }
    ... on DealChange { kind recordId version actor { name } record { ${DEAL} } }
  }
}`;

// Close codes after which reconnecting with the same token is pointless.
const REJECTED = {
  4401: 'Your session expired. Sign in again.',
  4403: 'The server rejected this token. Sign in again.',
};
const STATUS_TEXT = { connecting: 'Connecting…', live: 'Live', reconnecting: 'Reconnecting…', offline: 'Offline' };

class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

async function graphql(query, variables, token) {
  const headers = { 'content-type': 'application/json', accept: 'application/graphql-response+json, application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(GRAPHQL, { method: 'POST', headers, body: JSON.stringify({ query, variables }) });
  } catch {
    throw new ApiError('NETWORK', 'The server cannot be reached.');
  }
  const body = await response.json().catch(() => null);
  const error = body?.errors?.[0];
  if (error) throw new ApiError(error.extensions?.code ?? 'ERROR', error.message);
  if (!response.ok || !body?.data) throw new ApiError(`HTTP_${response.status}`, `The server answered ${response.status}.`);
  return body.data;
}

// One graphql-transport-ws connection. Subscriptions outlive the socket: after a reconnect they are
// sent again (and their streams start with a Resync). Reconnects back off exponentially with jitter.
class LiveConnection {
  constructor(token, { onStatus, onRejected }) {
    this.token = token;
    this.onStatus = onStatus;
    this.onRejected = onRejected;
    this.operations = new Map();
    this.nextId = 1;
    this.attempt = 0;
    this.acked = false;
    this.closed = false;
    this.connect();
  }

  connect() {
    const url = new URL(GRAPHQL, location.href);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    const socket = new WebSocket(url, 'graphql-transport-ws');
    this.socket = socket;
    this.acked = false;
    this.onStatus(this.attempt ? 'reconnecting' : 'connecting');
    socket.onopen = () => this.send({ type: 'connection_init', payload: { authorization: `Bearer ${this.token}` } });
    socket.onmessage = (message) => this.receive(JSON.parse(message.data));
    socket.onclose = (event) => this.lost(socket, event.code);
  }

  receive(message) {
    const operation = this.operations.get(message.id);
    switch (message.type) {
      case 'connection_ack':
        this.acked = true;
        this.attempt = 0;
        this.onStatus('live');
        for (const [id, op] of this.operations) this.start(id, op);
        break;
      case 'ping':
        this.send({ type: 'pong' });
        break;
      case 'next':
        operation?.next(message.payload);
        break;
      case 'error':
        this.operations.delete(message.id);
        operation?.error(message.payload);
        break;
      case 'complete':
        this.operations.delete(message.id);
        operation?.complete();
        break;
    }
  }

  lost(socket, code) {
    if (socket !== this.socket || this.closed) return;
    this.acked = false;
    if (code in REJECTED) {
      this.close();
      this.onRejected(REJECTED[code]);
      return;
    }
    const delay = Math.min(15000, 500 * 2 ** this.attempt) * (0.5 + Math.random() / 2);
    this.attempt += 1;
    this.onStatus('reconnecting');
    this.retry = setTimeout(() => this.connect(), delay);
  }

  // Returns a function that ends the subscription. handlers: next(payload), error(errors), complete().
  subscribe(query, variables, handlers) {
    const id = String(this.nextId++);
    const operation = { query, variables, ...handlers };
    this.operations.set(id, operation);
    if (this.acked) this.start(id, operation);
    return () => {
      if (this.operations.delete(id) && this.acked) this.send({ id, type: 'complete' });
    };
  }

  start(id, { query, variables }) {
    this.send({ id, type: 'subscribe', payload: { query, variables } });
  }

  send(message) {
    if (this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  close() {
    this.closed = true;
    clearTimeout(this.retry);
    this.onStatus('offline');
    this.socket.close(1000, 'signed out');
  }
}

// The deals of one pipeline: the latest snapshot plus every event since, the newest version winning.
class Board {
  constructor(pipelineId) {
    this.pipelineId = pipelineId;
    this.deals = new Map();
    this.versions = new Map();
    this.buffer = null; // events received while a snapshot loads
    this.generation = 0;
  }

  get synced() {
    return this.generation > 0 && this.buffer === null;
  }

  beginSnapshot() {
    this.buffer = [];
    return ++this.generation;
  }

  // False when a newer Resync started another snapshot meanwhile (that one will apply).
  loadSnapshot(generation, deals) {
    if (generation !== this.generation) return false;
    this.deals = new Map();
    this.versions = new Map();
    for (const deal of deals) this.put(deal.id, deal.version, deal);
    for (const event of this.buffer) this.applyEvent(event);
    this.buffer = null;
    return true;
  }

  apply(event) {
    this.buffer?.push(event);
    return this.applyEvent(event);
  }

  applyEvent({ kind, recordId, version, record }) {
    if ((this.versions.get(recordId) ?? -1) >= version) return false;
    const here = kind !== 'DELETED' && record?.pipeline.id === this.pipelineId;
    this.put(recordId, version, here ? record : null);
    return true;
  }

  put(id, version, deal) {
    this.versions.set(id, version);
    if (deal) this.deals.set(id, deal);
    else this.deals.delete(id);
  }

  column(stageId) {
    return [...this.deals.values()]
      .filter((deal) => deal.stage.id === stageId)
      .sort((a, b) => b.createdAt.localeCompare(a.createdAt) || b.id.localeCompare(a.id));
  }
}

// ---- page state -------------------------------------------------------------------------------

const page = {
  token: null,
  viewer: null,
  live: null,
  pipeline: null, // { id, name, stages: [{ id, name }] }
  board: null,
  summary: null,
  flash: null, // id of the deal that changed last: its card is highlighted
  unfollow: [],
  attempt: 0, // each sign-in or sign-out bumps it: a slower, older sign-in then gives up
};

const $ = (id) => document.getElementById(id);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  node.append(...children.filter((child) => child !== null && child !== undefined)); // text, never HTML
  return node;
}

function money(amount, currency) {
  try {
    return new Intl.NumberFormat(undefined, { style: 'currency', currency, maximumFractionDigits: 0 }).format(Number(amount));
  } catch {
    return `${amount} ${currency}`;
  }
}

function notice(message) {
  $('notice').textContent = message ?? '';
  $('notice').hidden = !message;
}

function showStatus(status) {
  $('status').dataset.status = status;
  $('status').textContent = STATUS_TEXT[status];
}

function showView(view) {
  document.body.dataset.view = view;
  $('sign-in').hidden = view !== 'sign-in';
  $('dashboard').hidden = view !== 'dashboard';
  $('identity').hidden = view !== 'dashboard';
}

function unfollowAll() {
  for (const stop of page.unfollow.splice(0)) stop();
}

function signOut(message) {
  page.attempt += 1;
  unfollowAll();
  page.live?.close();
  Object.assign(page, { token: null, viewer: null, live: null, pipeline: null, board: null, summary: null });
  sessionStorage.removeItem(TOKEN_KEY);
  showView('sign-in');
  notice(message);
}

async function open(token) {
  const attempt = ++page.attempt;
  notice(null);
  let viewer;
  try {
    viewer = await graphql(VIEWER, {}, token);
  } catch (error) {
    if (attempt === page.attempt) signOut(error.code === 'UNAUTHENTICATED' ? `Sign-in failed: ${error.message}` : error.message);
    return;
  }
  if (attempt !== page.attempt) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  Object.assign(page, { token, viewer });
  $('who').textContent = `${viewer.me.name} · ${viewer.tenant.name}`;
  $('pipeline').replaceChildren(...viewer.pipelines.map((p) => el('option', { value: p.id }, p.name)));
  showView('dashboard');
  if (!viewer.pipelines.length) {
    notice('This workspace has no pipelines yet.');
    return;
  }
  page.live = new LiveConnection(token, { onStatus: showStatus, onRejected: signOut });
  const wanted = new URLSearchParams(location.hash.slice(1)).get('pipeline');
  const pipeline = viewer.pipelines.find((p) => p.id === wanted) ?? viewer.pipelines[0];
  showPipeline(pipeline.id);
}

// Subscribe, and subscribe again when the server cut the stream off because this tab fell behind
// (SUBSCRIBER_TOO_SLOW): the new stream starts with a Resync or a full state, so nothing is lost.
// Any other error (the pipeline was deleted, say) is shown and ends the stream.
function follow(query, variables, onData) {
  let active = true;
  let stop = () => {};
  const run = () => {
    stop = page.live.subscribe(query, variables, {
      next: ({ data, errors }) => {
        if (errors?.length) notice(errors[0].message);
        if (data) onData(data);
      },
      error: (errors) => {
        if (!active) return;
        if (errors?.some((e) => e.extensions?.code === 'SUBSCRIBER_TOO_SLOW')) run();
        else notice(errors?.[0]?.message ?? 'The live update failed.');
      },
      complete: () => {},
    });
  };
  run();
  page.unfollow.push(() => {
    active = false;
    stop();
  });
}

function showPipeline(id) {
  unfollowAll();
  const pipeline = page.viewer.pipelines.find((p) => p.id === id);
  $('pipeline').value = id;
  history.replaceState(null, '', `${location.pathname}#${new URLSearchParams({ pipeline: id })}`);
  const board = new Board(id);
  Object.assign(page, { pipeline, board, summary: null, flash: null });
  render();
  follow(SUMMARY, { id }, ({ pipelineSummary }) => {
    page.summary = pipelineSummary;
    render();
  });
  follow(BOARD, { id }, ({ dealBoard: event }) => {
    if (event.__typename === 'Resync') {
      resync(board);
    } else if (board.apply(event)) {
      page.flash = event.recordId;
      render();
    }
  });
}

async function resync(board) {
  const generation = board.beginSnapshot();
  render();
  let data;
  try {
    data = await graphql(SNAPSHOT, { id: board.pipelineId, cards: CARDS_PER_STAGE }, page.token);
  } catch (error) {
    if (error.code === 'UNAUTHENTICATED') signOut(`Signed out: ${error.message}`);
    else if (board === page.board) notice(`The board could not be loaded: ${error.message}`);
    return;
  }
  if (board !== page.board) return;
  if (!data.pipeline) {
    notice('This pipeline no longer exists.');
    return;
  }
  page.pipeline = { id: data.pipeline.id, name: data.pipeline.name, stages: data.pipeline.stages };
  if (board.loadSnapshot(generation, data.pipeline.stages.flatMap((stage) => stage.deals))) render();
}

// ---- rendering (every value goes in as text) ------------------------------------------------------

function totalsByStage(summary) {
  const stages = new Map();
  for (const row of summary?.totals ?? []) {
    const stage = stages.get(row.stage.id) ?? { count: 0, money: [] };
    stage.count += row.count;
    stage.money.push(row);
    stages.set(row.stage.id, stage);
  }
  return stages;
}

function totalsByCurrency(summary) {
  const currencies = new Map();
  for (const row of summary?.totals ?? []) {
    const sum = currencies.get(row.currency) ?? { currency: row.currency, total: 0, weighted: 0, count: 0 };
    sum.total += Number(row.total);
    sum.weighted += Number(row.weightedTotal);
    sum.count += row.count;
    currencies.set(row.currency, sum);
  }
  return [...currencies.values()].sort((a, b) => b.total - a.total);
}

function summaryTiles(summary) {
  if (!summary) return [el('p', { class: 'muted' }, 'Loading totals…')];
  const count = summary.totals.reduce((n, row) => n + row.count, 0);
  const tiles = [el('div', { class: 'tile', 'data-total-count': String(count) },
    el('span', { class: 'label' }, 'Deals'), el('strong', {}, String(count)))];
  for (const sum of totalsByCurrency(summary)) {
    tiles.push(el('div', { class: 'tile', 'data-currency': sum.currency },
      el('span', { class: 'label' }, `Pipeline ${sum.currency}`),
      el('strong', {}, money(sum.total, sum.currency)),
      el('span', { class: 'muted' }, `weighted ${money(sum.weighted, sum.currency)}`)));
  }
  return tiles;
}

function card(deal) {
  const meta = [deal.company?.name, deal.owner?.name].filter(Boolean).join(' · ');
  return el('article', { class: `card ${deal.status.toLowerCase()}${deal.id === page.flash ? ' flash' : ''}`,
                         'data-deal-id': deal.id },
    el('h3', {}, deal.title),
    el('p', { class: 'amount' }, money(deal.amount, deal.currency)),
    meta ? el('p', { class: 'muted' }, meta) : null,
    deal.status === 'OPEN' ? null : el('span', { class: 'badge' }, deal.status));
}

function column(stage, deals, totals) {
  const count = totals?.count ?? 0;
  const known = page.summary !== null;
  return el('section', { class: 'column', 'data-stage-id': stage.id, 'aria-label': stage.name },
    el('header', {},
      el('h2', {}, stage.name),
      el('span', { class: 'count', 'data-count': known ? String(count) : null },
        known ? `${count} deal${count === 1 ? '' : 's'}` : '…'),
      ...(totals?.money ?? []).map((row) => el('p', { class: 'money' },
        `${money(row.total, row.currency)} · weighted ${money(row.weightedTotal, row.currency)}`))),
    el('div', { class: 'cards' }, ...deals.map(card)),
    known && count > deals.length ? el('p', { class: 'muted more' }, `Showing ${deals.length} of ${count}`) : null);
}

function render() {
  const { pipeline, board, summary } = page;
  if (!pipeline) return;
  const stages = totalsByStage(summary);
  $('summary').replaceChildren(...summaryTiles(summary));
  $('board').replaceChildren(...pipeline.stages.map((stage) => column(stage, board.column(stage.id), stages.get(stage.id))));
  $('updated').textContent = summary ? `Totals as of ${new Date(summary.timestamp).toLocaleTimeString()}` : '';
  document.body.dataset.synced = String(board.synced && summary !== null);
}

// ---- start ----------------------------------------------------------------------------------------

$('token-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const token = $('token').value.trim().replace(/^Bearer\s+/i, '');
  if (token) open(token);
});

$('login-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  try {
    const { login } = await graphql(LOGIN, {
      tenant: $('workspace').value.trim(), email: $('email').value.trim(), password: $('password').value,
    });
    $('password').value = '';
    await open(login.token);
  } catch (error) {
    notice(error.message);
  }
});

$('sign-out').addEventListener('click', () => signOut(null));
$('pipeline').addEventListener('change', (event) => showPipeline(event.target.value));

// A link may carry the token in its fragment (never sent to a server): keep it for this tab only.
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.has('token')) {
  sessionStorage.setItem(TOKEN_KEY, fragment.get('token'));
  fragment.delete('token');
  history.replaceState(null, '', `${location.pathname}${fragment.size ? `#${fragment}` : ''}`);
}
const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) open(saved);
else signOut(null);
