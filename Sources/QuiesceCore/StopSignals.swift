import Foundation
import Synchronization

/// SIGINT and SIGTERM as requests to stop: `handler` gets the signal and how many
/// stop signals have arrived so far (1 = stop gracefully, more = stop now), on a
/// dispatch thread. Keep the sources until the command ends (cancel them then).
public func onStopSignals(_ handler: @escaping @Sendable (_ signal: Int32, _ count: Int) -> Void) -> [DispatchSourceSignal] {
    let stops = Mutex(0)
    return [SIGINT, SIGTERM].map { number -> DispatchSourceSignal in
        signal(number, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: number)
        source.setEventHandler { handler(number, stops.withLock { $0 += 1; return $0 }) }
        source.resume()
        return source
    }
}
