/**
 * wsfleet's client for browsers and Node.js: `connect(urls, options)`, then `subscribe`,
 * `publish` and events. See README.md for the contract and a complete example.
 */
export {
  Client,
  connect,
  protocolUrl,
  validChannel,
  type ClientEvents,
  type ClientState,
  type ConnectOptions,
  type ConnectedEvent,
  type ConnectingEvent,
  type DisconnectedEvent,
  type DiscontinuityEvent,
  type MessageMeta,
  type Position,
  type PublishResult,
  type SubscribeOptions,
  type SubscribedEvent,
  type Subscription,
  type Timers,
  type WebSocketConstructor,
  type WebSocketLike,
} from "./client.js";
export { backoffCap, reconnectDelay, resolveBackoff, type BackoffOptions } from "./backoff.js";
export { WsfleetError, type ClientErrorCode, type ErrorCode, type ServerErrorCode } from "./errors.js";
