// Package log mirrors Tyk's log package: Get returns a logger with the logrus methods Tyk
// plugins call. Lines go to the gateway's log, tagged with the API, plugin and hook of the
// call that wrote them (lines written outside a hook carry no tags).
package log

import (
	"fmt"
	"sort"
	"strings"

	"gatehouse.dev/go/internal/host"
)

// Fields are key-value pairs added to a line, as logrus.Fields.
type Fields map[string]interface{}

// Logger writes to the gateway's log. Its methods are safe for concurrent use.
type Logger struct{ entry Entry }

var std = &Logger{}

// Get returns the logger, as Tyk's log.Get does.
func Get() *Logger { return std }

// Entry is a logger with fields, as a logrus.Entry.
type Entry struct {
	fields Fields
}

func (e Entry) with(f Fields) *Entry {
	all := make(Fields, len(e.fields)+len(f))
	for k, v := range e.fields {
		all[k] = v
	}
	for k, v := range f {
		all[k] = v
	}
	return &Entry{fields: all}
}

// WithField returns an entry that adds key=value to its lines.
func (e *Entry) WithField(key string, value interface{}) *Entry { return e.with(Fields{key: value}) }

// WithFields returns an entry that adds fields to its lines.
func (e *Entry) WithFields(f Fields) *Entry { return e.with(f) }

// WithError adds err as the field "error".
func (e *Entry) WithError(err error) *Entry { return e.with(Fields{"error": err}) }

func (e *Entry) write(level host.Level, msg string) {
	if len(e.fields) > 0 {
		keys := make([]string, 0, len(e.fields))
		for k := range e.fields {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var b strings.Builder
		b.WriteString(msg)
		for _, k := range keys {
			fmt.Fprintf(&b, " %s=%v", k, e.fields[k])
		}
		msg = b.String()
	}
	host.Log(level, msg)
}

func sprintln(args []interface{}) string {
	return strings.TrimSuffix(fmt.Sprintln(args...), "\n")
}

// The logrus methods: the plain ones format as fmt.Sprint, the f ones as fmt.Sprintf and
// the ln ones as fmt.Sprintln.

func (e *Entry) Trace(args ...interface{}) { e.write(host.LevelDebug, fmt.Sprint(args...)) }
func (e *Entry) Tracef(format string, args ...interface{}) {
	e.write(host.LevelDebug, fmt.Sprintf(format, args...))
}
func (e *Entry) Traceln(args ...interface{}) { e.write(host.LevelDebug, sprintln(args)) }
func (e *Entry) Debug(args ...interface{})   { e.write(host.LevelDebug, fmt.Sprint(args...)) }
func (e *Entry) Debugf(format string, args ...interface{}) {
	e.write(host.LevelDebug, fmt.Sprintf(format, args...))
}
func (e *Entry) Debugln(args ...interface{}) { e.write(host.LevelDebug, sprintln(args)) }
func (e *Entry) Info(args ...interface{})    { e.write(host.LevelInfo, fmt.Sprint(args...)) }
func (e *Entry) Infof(format string, args ...interface{}) {
	e.write(host.LevelInfo, fmt.Sprintf(format, args...))
}
func (e *Entry) Infoln(args ...interface{}) { e.write(host.LevelInfo, sprintln(args)) }
func (e *Entry) Print(args ...interface{})  { e.write(host.LevelInfo, fmt.Sprint(args...)) }
func (e *Entry) Printf(format string, args ...interface{}) {
	e.write(host.LevelInfo, fmt.Sprintf(format, args...))
}
func (e *Entry) Println(args ...interface{}) { e.write(host.LevelInfo, sprintln(args)) }
func (e *Entry) Warn(args ...interface{})    { e.write(host.LevelWarn, fmt.Sprint(args...)) }
func (e *Entry) Warnf(format string, args ...interface{}) {
	e.write(host.LevelWarn, fmt.Sprintf(format, args...))
}
func (e *Entry) Warnln(args ...interface{})  { e.write(host.LevelWarn, sprintln(args)) }
func (e *Entry) Warning(args ...interface{}) { e.write(host.LevelWarn, fmt.Sprint(args...)) }
func (e *Entry) Warningf(format string, args ...interface{}) {
	e.write(host.LevelWarn, fmt.Sprintf(format, args...))
}
func (e *Entry) Warningln(args ...interface{}) { e.write(host.LevelWarn, sprintln(args)) }
func (e *Entry) Error(args ...interface{})     { e.write(host.LevelError, fmt.Sprint(args...)) }
func (e *Entry) Errorf(format string, args ...interface{}) {
	e.write(host.LevelError, fmt.Sprintf(format, args...))
}
func (e *Entry) Errorln(args ...interface{}) { e.write(host.LevelError, sprintln(args)) }

// Fatal logs at error level. Unlike logrus it does not exit: a plugin never ends the
// gateway's process.
func (e *Entry) Fatal(args ...interface{}) { e.write(host.LevelError, fmt.Sprint(args...)) }

// Fatalf is Fatal with a format.
func (e *Entry) Fatalf(format string, args ...interface{}) {
	e.write(host.LevelError, fmt.Sprintf(format, args...))
}

// Panic logs at error level, then panics, as logrus does; the gateway answers 500.
func (e *Entry) Panic(args ...interface{}) {
	msg := fmt.Sprint(args...)
	e.write(host.LevelError, msg)
	panic(msg)
}

// Panicf is Panic with a format.
func (e *Entry) Panicf(format string, args ...interface{}) {
	msg := fmt.Sprintf(format, args...)
	e.write(host.LevelError, msg)
	panic(msg)
}

// The same methods on the Logger itself.

func (l *Logger) WithField(key string, value interface{}) *Entry {
	return l.entry.WithField(key, value)
}
func (l *Logger) WithFields(f Fields) *Entry                  { return l.entry.WithFields(f) }
func (l *Logger) WithError(err error) *Entry                  { return l.entry.WithError(err) }
func (l *Logger) Trace(args ...interface{})                   { l.entry.Trace(args...) }
func (l *Logger) Tracef(format string, args ...interface{})   { l.entry.Tracef(format, args...) }
func (l *Logger) Traceln(args ...interface{})                 { l.entry.Traceln(args...) }
func (l *Logger) Debug(args ...interface{})                   { l.entry.Debug(args...) }
func (l *Logger) Debugf(format string, args ...interface{})   { l.entry.Debugf(format, args...) }
func (l *Logger) Debugln(args ...interface{})                 { l.entry.Debugln(args...) }
func (l *Logger) Info(args ...interface{})                    { l.entry.Info(args...) }
func (l *Logger) Infof(format string, args ...interface{})    { l.entry.Infof(format, args...) }
func (l *Logger) Infoln(args ...interface{})                  { l.entry.Infoln(args...) }
func (l *Logger) Print(args ...interface{})                   { l.entry.Print(args...) }
func (l *Logger) Printf(format string, args ...interface{})   { l.entry.Printf(format, args...) }
func (l *Logger) Println(args ...interface{})                 { l.entry.Println(args...) }
func (l *Logger) Warn(args ...interface{})                    { l.entry.Warn(args...) }
func (l *Logger) Warnf(format string, args ...interface{})    { l.entry.Warnf(format, args...) }
func (l *Logger) Warnln(args ...interface{})                  { l.entry.Warnln(args...) }
func (l *Logger) Warning(args ...interface{})                 { l.entry.Warning(args...) }
func (l *Logger) Warningf(format string, args ...interface{}) { l.entry.Warningf(format, args...) }
func (l *Logger) Warningln(args ...interface{})               { l.entry.Warningln(args...) }
func (l *Logger) Error(args ...interface{})                   { l.entry.Error(args...) }
func (l *Logger) Errorf(format string, args ...interface{})   { l.entry.Errorf(format, args...) }
func (l *Logger) Errorln(args ...interface{})                 { l.entry.Errorln(args...) }
func (l *Logger) Fatal(args ...interface{})                   { l.entry.Fatal(args...) }
func (l *Logger) Fatalf(format string, args ...interface{})   { l.entry.Fatalf(format, args...) }
func (l *Logger) Panic(args ...interface{})                   { l.entry.Panic(args...) }
func (l *Logger) Panicf(format string, args ...interface{})   { l.entry.Panicf(format, args...) }
