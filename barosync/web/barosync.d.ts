// Types of the barosync browser client (barosync.js), kept by hand and checked
// against the module by tests/test_web_client.py (tsc --noEmit on a usage file).

export type ConnectionState = "connecting" | "connected" | "reconnecting" | "offline" | "needs-auth" | "closed";

export interface CalendarEvent {
  id: string;
  projectId: string;
  title: string;
  startDate: string;
  endDate: string;
  description?: string;
  allDay?: boolean;
  location?: string;
  attendees?: string[];
  color?: string;
  /** A recurring event's rule, extra and skipped starts and changed occurrences
   * (docs/protocol.md); startDate/endDate are the first occurrence. */
  recurrence?: Recurrence | null;
  /** The zone calendar apps show the times in (an IANA or Windows name). */
  timeZone?: string | null;
  /** What a calendar app sent that barosync does not model; leave it as it is. */
  ical?: string | null;
  version: number;
  createdAt?: number;
  updatedAt?: number;
  createdBy?: string;
  updatedBy?: string;
  /** True while this client's change to it waits for the server. */
  pending?: boolean;
}

export interface Recurrence {
  rrule: string | null;
  rdates: string[];
  exdates: string[];
  overrides: Array<{ recurrenceId: string; startDate: string; endDate: string; title?: string;
                     location?: string; description?: string; allDay?: boolean }>;
}

export type EventFields = Partial<Omit<CalendarEvent, "version" | "createdAt" | "updatedAt" | "createdBy" | "updatedBy" | "pending">>;

export interface PresentUser {
  id: string;
  name: string;
  avatar?: string | null;
  color: string;
  lastSeen: number;
  projectId: string;
}

export interface Conflict {
  ref: string;
  id: string;
  projectId: string;
  operation: "update" | "delete";
  localVersion: CalendarEvent | null;
  remoteVersion: CalendarEvent | null;
  base?: CalendarEvent | null;
  resolved?: CalendarEvent | null;
  strategy: string;
  fields: string[];
}

export interface SyncStatus {
  pending: number;
  oldestPendingAge: number;
  status: "synced" | "saving" | "offline";
}

export interface StateDetail { state: ConnectionState; code: number | null; reason: string; retryAt: number | null; }
export interface ChangeDetail { projectId: string; kind: string; id?: string; seq?: number; userId?: string; event?: CalendarEvent; local?: boolean; ok?: boolean; }
export interface PresenceDetail { projectId: string; users: PresentUser[]; user?: PresentUser; joined?: boolean; }
export interface CursorDetail { projectId: string; userId: string; x: number; y: number; elementId?: string | null; timestamp: number; }
export interface ConflictDetail { conflict: Conflict; }
export interface SyncDetail extends SyncStatus { projectId?: string; live?: boolean; error?: { code: string; message: string; retryAfter?: number }; }
export interface StorageDetail { kind: "indexeddb" | "memory"; }
export interface AccessDetail { projectId: string; writable: boolean; }

export interface SyncClientEventMap {
  state: CustomEvent<StateDetail>;
  change: CustomEvent<ChangeDetail>;
  presence: CustomEvent<PresenceDetail>;
  cursor: CustomEvent<CursorDetail>;
  conflict: CustomEvent<ConflictDetail>;
  sync: CustomEvent<SyncDetail>;
  storage: CustomEvent<StorageDetail>;
  access: CustomEvent<AccessDetail>;
  leader: CustomEvent<{ leader: boolean }>;
  error: CustomEvent<{ code: string; message: string; ref: string | null; projectId?: string }>;
}

export type TokenSource = string | (() => string | null | Promise<string | null>);

export interface SyncClientOptions {
  token: TokenSource;
  storage?: "indexeddb" | "memory";
  /** Name of the IndexedDB database, the tab lock and the channel (default: per URL). */
  name?: string;
  WebSocket?: typeof WebSocket;
}

export class MutationRefused extends Error {
  code: string;
  field?: string;
}

export class ConflictError extends Error {
  conflict: Conflict;
}

export function uuid(): string;
export function backoffDelay(attempt: number, random?: () => number): number;

export class SyncClient extends EventTarget {
  constructor(url: string, options: SyncClientOptions);
  readonly url: string;
  state: ConnectionState;
  closeCode: number | null;
  closeReason: string;
  user: { id: string; name: string; avatar?: string | null; color?: string | null } | null;
  storageKind: "indexeddb" | "memory" | null;
  retryAt?: number | null;

  ready(): Promise<void>;
  close(): void;
  reconnect(token?: TokenSource): void;

  subscribe(projectId: string): Promise<void>;
  unsubscribe(projectId: string): void;
  events(projectId: string): CalendarEvent[];
  /** An event by id, in projectId when given (the same id may be in two projects). */
  get(id: string, projectId?: string): CalendarEvent | undefined;
  presence(projectId: string): PresentUser[];
  lastSeq(projectId: string): number | null;
  /** Whether this user may change the project (false: a viewer); null until subscribed. */
  writable(projectId: string): boolean | null;
  syncStatus(): SyncStatus;

  create(projectId: string, fields: EventFields): Promise<CalendarEvent>;
  update(id: string, changes: EventFields, projectId?: string): Promise<CalendarEvent>;
  /** Bring back an event deleted in its project (undo): same id, fields and history. */
  restore(event: CalendarEvent): Promise<CalendarEvent>;
  delete(id: string, projectId?: string): Promise<void>;
  resolve(conflict: Conflict, choice: "local" | "remote" | EventFields): Promise<CalendarEvent | undefined>;
  moveCursor(projectId: string, x: number, y: number, elementId?: string): void;

  addEventListener<K extends keyof SyncClientEventMap>(type: K, listener: (ev: SyncClientEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof SyncClientEventMap>(type: K, listener: (ev: SyncClientEventMap[K]) => void,
    options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | EventListenerOptions): void;
}
