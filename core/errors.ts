// User-facing errors. Anything thrown as AhaError is printed by main.ts as one line
// ("aha: <message>") with no stack trace; UsageError additionally exits with status 2.

export class AhaError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "AhaError";
  }
}

export class UsageError extends AhaError {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}
