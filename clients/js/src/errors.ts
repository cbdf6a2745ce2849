/**
 * Typed errors. Every error the client raises or reports is a {@link WsfleetError} with a
 * `code`: the server's error code when the server said it (`bus_unavailable`,
 * `subscription_limit`, ...; see the protocol section of the wsfleet README), or one of the
 * client's own codes ({@link ClientErrorCode}).
 */

/** Codes of the server's `{"type":"error"}` frames. */
export type ServerErrorCode =
  | "invalid_json"
  | "unknown_op"
  | "invalid_field"
  | "invalid_channel"
  | "subscription_limit"
  | "not_subscribed"
  | "already_subscribed"
  | "binary_not_supported"
  | "bus_unavailable"
  /** The connection's token does not allow this operation on this channel. */
  | "forbidden"
  /** A `refresh` was refused; the old token stays in force until it expires. */
  | "invalid_token"
  /** Over the server's `--publish-rate` or `--subscribe-rate`: not published / not subscribed. */
  | "rate_limited"
  /** The server holds `--max-channels` channels and this one is new: not subscribed. */
  | "channel_limit"
  /** The subscribe took longer than the server's `--subscribe-timeout`: not subscribed. */
  | "timeout"
  /** A publish reached the server's bus but its answer never came: it may or may not have been published. */
  | "outcome_unknown";

/** Codes the client raises itself. */
export type ClientErrorCode =
  /** The publish buffer (used while disconnected) is at its count or byte limit: not sent. */
  | "buffer_full"
  /** The client was closed before the publish could be sent: not sent. */
  | "closed"
  /** The publish waited in the buffer longer than `publishTimeoutMs`: not sent. */
  | "timeout"
  /** The channel name breaks the naming rule (checked before anything is sent). */
  | "invalid_channel"
  /** `data` cannot be sent: `undefined`, `null` or not JSON-serialisable. */
  | "invalid_data"
  /** This client already has a subscription to the channel. */
  | "already_subscribed"
  /** `getToken` threw or returned something that is not a string. */
  | "token_failed";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

export class WsfleetError extends Error {
  /** The server's error code, or the client's own. */
  readonly code: ErrorCode;
  /** True when the server sent this error (an error frame); false when the client raised it. */
  readonly fromServer: boolean;
  /** The operation it concerns, when known. */
  readonly op?: "subscribe" | "unsubscribe" | "publish" | "refresh";
  /** The channel it concerns, when known. */
  readonly channel?: string;

  constructor(
    code: ErrorCode,
    message: string,
    opts: { fromServer?: boolean; op?: "subscribe" | "unsubscribe" | "publish" | "refresh"; channel?: string; cause?: unknown } = {},
  ) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "WsfleetError";
    this.code = code;
    this.fromServer = opts.fromServer ?? false;
    this.op = opts.op;
    this.channel = opts.channel;
  }
}
