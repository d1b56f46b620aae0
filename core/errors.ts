// User-facing errors. Anything thrown as AhaError is printed by main.ts as one line
// ("aha: <message>") with no stack trace; UsageError additionally exits with status 2.

export class AhaError extends Error {
  /** The process's exit status when this error ends it. */
  readonly status: number = 1;
  constructor(message: string) {
    super(message);
    this.name = "AhaError";
  }
}

export class UsageError extends AhaError {
  override readonly status: number = 2;
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** A run stopped by a signal after saving what it had: exits 128 + the signal's number. */
export class Interrupted extends AhaError {
  override readonly status: number;
  constructor(signal: "SIGINT" | "SIGTERM", what: string) {
    super(`interrupted by ${signal}; ${what}`);
    this.name = "Interrupted";
    this.status = signal === "SIGINT" ? 130 : 143;
  }
}
