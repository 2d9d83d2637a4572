// Package analytics mirrors tyk-pump's analytics package: the record an analytics hook
// reads and edits before it is written.
package analytics

import "time"

// Latency of the request, in milliseconds.
type Latency struct {
	Total    int64 `json:"total"`
	Upstream int64 `json:"upstream"`
}

// AnalyticsRecord is one request's analytics record. RawRequest and RawResponse hold the
// bodies (base64), when the API records them (analytics.detailedRecording); Tyk's hold
// the whole raw HTTP message.
type AnalyticsRecord struct {
	Method        string    `json:"method"`
	Path          string    `json:"path"`
	ContentLength int64     `json:"content_length"`
	ResponseCode  int       `json:"response_code"`
	APIKey        string    `json:"api_key"`
	TimeStamp     time.Time `json:"timestamp"`
	APIName       string    `json:"api_name"`
	APIID         string    `json:"api_id"`
	RequestTime   int64     `json:"request_time"`
	Latency       Latency   `json:"latency"`
	RawRequest    string    `json:"raw_request"`
	RawResponse   string    `json:"raw_response"`
	IPAddress     string    `json:"ip_address"`
	Tags          []string  `json:"tags"`
	Alias         string    `json:"alias"`
}
